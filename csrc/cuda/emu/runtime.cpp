// The emulated CUDA runtime behind runtime.h: fibers with their own stacks, the block scheduler (thread
// and block order varied per launch), per-block poisoned shared memory, checked barriers and warp
// collectives, launch limits, device profiles, launch counts and the Python surface.
#include "runtime.h"

#include <c10/util/Exception.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <numeric>
#include <random>
#include <sstream>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define NORMEXT_EMU_ASAN 1
#endif

#if !defined(__x86_64__)
#error "the CUDA emulation's context switch is written for x86-64"
#endif

namespace normext::emu {

uint3 g_thread_idx;
uint3 g_block_idx;
dim3 g_block_dim;
dim3 g_grid_dim;

namespace {

// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores the
// stack pointer in *from and resumes the context whose saved stack pointer is `to` (x86-64 System V).
extern "C" void normext_emu_switch(void** from, void* to);
asm(R"(
  .text
  .p2align 4
  .globl normext_emu_switch
  .hidden normext_emu_switch
  .type normext_emu_switch,@function
normext_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size normext_emu_switch,.-normext_emu_switch
)");

constexpr int kWarp = 32;
constexpr size_t kStackBytes = size_t(256) << 10;
constexpr size_t kDefaultSmem = size_t(48) << 10;
constexpr unsigned char kPoison = 0xff;  // NaN in float, half and bfloat16; -1 in integers

// What the host planning code may ask of the device. Registers per thread are not known without the
// compiled kernel: occupancy assumes 64, so planning that depends on it is exercised, not reproduced.
struct Profile {
  const char* name;
  int sms;
  size_t smem_per_sm, smem_optin;
  int threads_per_sm, blocks_per_sm, regs_per_sm;
};
constexpr Profile kProfiles[] = {
    {"H100", 132, 228 << 10, 227 << 10, 2048, 32, 65536},
    {"H200", 132, 228 << 10, 227 << 10, 2048, 32, 65536},
    {"A100", 108, 164 << 10, 163 << 10, 2048, 32, 65536},
};

enum class Order { kCycle, kForward, kReverse, kShuffle };

enum class State { kRunnable, kBarrier, kWarp, kDone };

struct Fiber {
  void* sp = nullptr;
  char* stack = nullptr;  // lowest address of kStackBytes usable bytes
  uint3 tid{};
  State state = State::kRunnable;
  WarpOp op{};
  unsigned mask = 0;
  int arg = 0, width = 0;
  uint64_t bits = 0, result = 0;
#ifdef NORMEXT_EMU_ASAN
  void* fake_stack = nullptr;
#endif
};

struct AlignedFree {
  void operator()(void* p) const { ::operator delete(p, std::align_val_t{16}); }
};
using Storage = std::unique_ptr<void, AlignedFree>;

Storage poisoned(size_t bytes) {
  Storage s(::operator new(std::max<size_t>(bytes, 1), std::align_val_t{16}));
  std::memset(s.get(), kPoison, bytes);
  return s;
}

struct Launch {
  std::string name;
  const void* kernel = nullptr;
  dim3 grid, block;
  size_t smem = 0, smem_limit = kDefaultSmem;
  const std::function<void()>* body = nullptr;
  int nthreads = 0;
  std::vector<Fiber>* fibers = nullptr;
  // The running block.
  std::vector<std::pair<const void*, Storage>> shared;
  size_t static_smem = 0;
  Storage dynamic;
  std::string error;
  void* sched_sp = nullptr;
#ifdef NORMEXT_EMU_ASAN
  const void* sched_stack = nullptr;
  size_t sched_stack_size = 0;
#endif
};

std::mutex g_mutex;  // one emulated launch at a time: the built-ins are process-wide
Launch* g_launch = nullptr;
Fiber* g_cur = nullptr;
std::vector<char*> g_stacks;
std::vector<Fiber> g_fibers;
std::map<std::string, uint64_t> g_counts, g_totals;  // since the last reset / since load
// Vector accesses (load_vec / store_float) since the last reset by element size and width:
// g_vector_bytes[e][k] counts those of 2^k bytes of 2^e-byte elements. Written only by the thread running a
// launch, which holds g_mutex.
constexpr int kWidths = 5;  // 1 to 16 bytes
uint64_t g_vector_bytes[kWidths][kWidths] = {};

int log2_width(size_t bytes) {
  int k = 0;
  while (k + 1 < kWidths && (size_t(1) << k) < bytes) ++k;
  return k;
}
std::map<const void*, size_t> g_smem_optin;
const Profile* g_profile = &kProfiles[0];
Order g_order = Order::kCycle;
uint64_t g_seed = 0, g_launch_no = 0;

std::string fmt3(unsigned x, unsigned y, unsigned z) {
  std::ostringstream s;
  s << "(" << x << ", " << y << ", " << z << ")";
  return s.str();
}

// "(gn_kernel<scalar_t, VEC>)" -> "gn_kernel": the name a coverage report counts once per template.
std::string base_name(const char* spelled) {
  std::string s;
  for (const char* c = spelled; *c && *c != '<'; ++c) {
    if (*c != '(' && *c != ')' && *c != ' ') s += *c;
  }
  return s;
}

std::string where() {
  const Launch& L = *g_launch;
  return L.name + " <<<" + fmt3(L.grid.x, L.grid.y, L.grid.z) + ", " + fmt3(L.block.x, L.block.y, L.block.z) +
         ", " + std::to_string(L.smem) + ">>> block " + fmt3(g_block_idx.x, g_block_idx.y, g_block_idx.z);
}

char* new_stack() {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  TORCH_CHECK(p != MAP_FAILED, "cuda-emu: cannot map a fiber stack");
  // A guard page below the stack turns an overflow into a fault instead of silent corruption.
  TORCH_CHECK(mprotect(p, page, PROT_NONE) == 0, "cuda-emu: cannot protect a fiber stack");
  return static_cast<char*>(p) + page;
}

void switch_to_scheduler(bool dying) {
  Fiber* f = g_cur;
  Launch& L = *g_launch;
#ifdef NORMEXT_EMU_ASAN
  __sanitizer_start_switch_fiber(dying ? nullptr : &f->fake_stack, L.sched_stack, L.sched_stack_size);
#else
  (void)dying;
#endif
  normext_emu_switch(&f->sp, L.sched_sp);
#ifdef NORMEXT_EMU_ASAN
  __sanitizer_finish_switch_fiber(f->fake_stack, &L.sched_stack, &L.sched_stack_size);
#endif
}

[[noreturn]] void fiber_entry() {
#ifdef NORMEXT_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_launch->sched_stack, &g_launch->sched_stack_size);
#endif
  (*g_launch->body)();
  g_cur->state = State::kDone;
  switch_to_scheduler(true);
  __builtin_unreachable();
}

// A fresh context on f's stack that starts in fiber_entry: the frame normext_emu_switch pops (control
// words, six registers, the return address) with the stack 16-byte aligned at entry as after a call.
void init_context(Fiber& f) {
#ifdef NORMEXT_EMU_ASAN
  // A fiber abandoned by a failed launch leaves its frames' redzones poisoned on the stack it reuses.
  ASAN_UNPOISON_MEMORY_REGION(f.stack, kStackBytes);
#endif
  const uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack) + kStackBytes) & ~uintptr_t(15);
  auto* s = reinterpret_cast<uint64_t*>(top - 80);
  std::memset(s, 0, 80);
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  std::memcpy(s, &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(s) + 4, &fpucw, 2);
  s[8] = reinterpret_cast<uint64_t>(&fiber_entry);
  f.sp = s;
  f.state = State::kRunnable;
}

void run_fiber(Fiber& f) {
  Launch& L = *g_launch;
  g_cur = &f;
  g_thread_idx = f.tid;
#ifdef NORMEXT_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack, kStackBytes);
#endif
  normext_emu_switch(&L.sched_sp, f.sp);
#ifdef NORMEXT_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  g_cur = nullptr;
}

[[noreturn]] void host_fail(const std::string& what) {
  TORCH_CHECK(false, "cuda-emu: ", where(), ": ", what);
  __builtin_unreachable();
}

std::string hex(unsigned v) {
  std::ostringstream s;
  s << "0x" << std::hex << v;
  return s.str();
}

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kShflIdx:
      return "__shfl_sync";
    case WarpOp::kShflUp:
      return "__shfl_up_sync";
    case WarpOp::kShflDown:
      return "__shfl_down_sync";
    case WarpOp::kShflXor:
      return "__shfl_xor_sync";
    case WarpOp::kSync:
      return "__syncwarp";
    case WarpOp::kBallot:
      return "__ballot_sync";
  }
  return "?";
}

std::string thread_name(const Fiber& f) { return "thread " + fmt3(f.tid.x, f.tid.y, f.tid.z); }

// The source lane of a shuffle (PTX shfl.sync), or `lane` itself when the source is outside its segment.
int shuffle_source(WarpOp op, int lane, int arg, int width) {
  const int seg = lane & ~(width - 1), last = seg + width - 1;
  int j = lane;
  switch (op) {
    case WarpOp::kShflIdx:
      j = seg + (arg & (width - 1));
      break;
    case WarpOp::kShflUp:
      j = lane - arg;
      return j >= seg ? j : lane;
    case WarpOp::kShflDown:
      j = lane + arg;
      break;
    case WarpOp::kShflXor:
      j = lane ^ arg;
      break;
    default:
      return lane;
  }
  return j <= last ? j : lane;
}

// Completes every warp collective whose lanes have all arrived. Returns whether any thread was released.
bool resolve_warps(std::vector<Fiber>& fibers, int n) {
  bool released = false;
  for (int base = 0; base < n; base += kWarp) {
    const int lanes = std::min(kWarp, n - base);
    for (int l = 0; l < lanes; ++l) {
      Fiber& f = fibers[base + l];
      if (f.state != State::kWarp) continue;
      const unsigned M = f.mask;
      for (int k = 0; k < lanes; ++k) {
        if (!((M >> k) & 1u)) continue;
        const Fiber& g = fibers[base + k];
        if (g.state == State::kWarp && g.mask == M && g.op == f.op && g.width == f.width) continue;
        std::string other;
        if (g.state == State::kWarp) {
          other = std::string("is in ") + op_name(g.op) + " with mask " + hex(g.mask);
        } else if (g.state == State::kBarrier) {
          other = "is waiting in __syncthreads";
        } else {
          other = "has exited";
        }
        host_fail(thread_name(f) + " waits in " + op_name(f.op) + " with mask " + hex(M) + ", but lane " +
                  std::to_string(k) + " of its warp (" + thread_name(g) + ") " + other);
      }
      unsigned ballot = 0;
      for (int k = 0; k < lanes; ++k) {
        if ((M >> k) & 1u && fibers[base + k].bits) ballot |= 1u << k;
      }
      for (int k = 0; k < lanes; ++k) {
        if (!((M >> k) & 1u)) continue;
        Fiber& g = fibers[base + k];
        if (g.op == WarpOp::kBallot) {
          g.result = ballot;
        } else if (g.op == WarpOp::kSync) {
          g.result = 0;
        } else {
          const int j = shuffle_source(g.op, k, g.arg, g.width);
          if (!((M >> j) & 1u)) {
            host_fail(thread_name(g) + " reads lane " + std::to_string(j) + " in " + op_name(g.op) +
                      ", which is not in the mask " + hex(M));
          }
          g.result = fibers[base + j].bits;
        }
        g.state = State::kRunnable;
      }
      released = true;
    }
  }
  return released;
}

void order_of(std::vector<int>& order, Order o, std::mt19937_64& rng) {
  std::iota(order.begin(), order.end(), 0);
  if (o == Order::kReverse) std::reverse(order.begin(), order.end());
  if (o == Order::kShuffle) std::shuffle(order.begin(), order.end(), rng);
}

void run_block(Launch& L, Order o, std::mt19937_64& rng) {
  std::vector<Fiber>& fibers = *L.fibers;
  const int n = L.nthreads;
  L.shared.clear();
  L.static_smem = 0;
  L.dynamic = poisoned(L.smem);
  for (int i = 0; i < n; ++i) {
    Fiber& f = fibers[i];
    f.tid = {i % L.block.x, (i / L.block.x) % L.block.y, i / (L.block.x * L.block.y)};
    init_context(f);
  }
  std::vector<int> order(n);
  for (;;) {
    order_of(order, o, rng);
    for (int i : order) {
      if (fibers[i].state == State::kRunnable) {
        run_fiber(fibers[i]);
        if (!L.error.empty()) TORCH_CHECK(false, L.error);
      }
    }
    if (resolve_warps(fibers, n)) continue;
    int done = 0, barrier = 0;
    const Fiber* exited = nullptr;
    for (int i = 0; i < n; ++i) {
      if (fibers[i].state == State::kDone) {
        ++done;
        exited = &fibers[i];
      }
      if (fibers[i].state == State::kBarrier) ++barrier;
    }
    if (done == n) break;
    if (barrier + done == n) {
      if (done > 0) {
        host_fail("__syncthreads() is reached by " + std::to_string(barrier) + " threads while " +
                  std::to_string(done) + " have exited (e.g. " + thread_name(*exited) +
                  "): every thread of the block must reach each barrier");
      }
      for (int i = 0; i < n; ++i) fibers[i].state = State::kRunnable;
      continue;
    }
    host_fail("threads wait on each other forever (warp collectives that never complete)");
  }
  if (L.static_smem > kDefaultSmem || L.static_smem + L.smem > L.smem_limit) {
    host_fail("uses " + std::to_string(L.static_smem) + " bytes of static and " + std::to_string(L.smem) +
              " of dynamic shared memory, more than the " + std::to_string(L.smem_limit) + " allowed");
  }
}

void check_launch(const Launch& L) {
  const uint64_t threads = uint64_t(L.block.x) * L.block.y * L.block.z;
  if (threads == 0 || threads > 1024 || L.block.x > 1024 || L.block.y > 1024 || L.block.z > 64) {
    host_fail("invalid block size: at most 1024 threads, blockDim.z <= 64, none zero");
  }
  if (L.grid.x == 0 || L.grid.y == 0 || L.grid.z == 0 || L.grid.x > 2147483647u || L.grid.y > 65535 ||
      L.grid.z > 65535) {
    host_fail("invalid grid: gridDim.x in [1, 2^31 - 1], gridDim.y and gridDim.z in [1, 65535]");
  }
  if (L.smem > L.smem_limit) {
    host_fail(std::to_string(L.smem) +
              " bytes of dynamic shared memory need allow_dynamic_smem (the limit is " +
              std::to_string(L.smem_limit) + " bytes" +
              (L.smem_limit == kDefaultSmem ? " without the opt-in" : "") + ")");
  }
}

Order parse_order(const std::string& s) {
  if (s == "cycle") return Order::kCycle;
  if (s == "forward") return Order::kForward;
  if (s == "reverse") return Order::kReverse;
  if (s == "shuffle") return Order::kShuffle;
  TORCH_CHECK(false, "cuda-emu: unknown schedule '", s, "' (cycle, forward, reverse or shuffle)");
}

const char* order_name(Order o) {
  switch (o) {
    case Order::kCycle:
      return "cycle";
    case Order::kForward:
      return "forward";
    case Order::kReverse:
      return "reverse";
    case Order::kShuffle:
      return "shuffle";
  }
  return "?";
}

// NORMEXT_EMU_SCHEDULE / NORMEXT_EMU_SEED / NORMEXT_EMU_DEVICE set the starting state.
struct FromEnvironment {
  FromEnvironment() {
    if (const char* s = std::getenv("NORMEXT_EMU_SCHEDULE")) g_order = parse_order(s);
    if (const char* s = std::getenv("NORMEXT_EMU_SEED")) g_seed = std::strtoull(s, nullptr, 10);
    if (const char* s = std::getenv("NORMEXT_EMU_DEVICE")) {
      for (const Profile& p : kProfiles) {
        if (std::string(s) == p.name) g_profile = &p;
      }
    }
  }
} g_from_environment;

}  // namespace

void run_grid(const char* name, const void* kernel, dim3 grid, dim3 block, size_t smem,
              const std::function<void()>& body) {
  std::lock_guard<std::mutex> lock(g_mutex);
  Launch L;
  L.name = base_name(name);
  L.kernel = kernel;
  L.grid = grid;
  L.block = block;
  L.smem = smem;
  L.body = &body;
  const auto optin = g_smem_optin.find(kernel);
  if (optin != g_smem_optin.end()) L.smem_limit = optin->second;
  g_launch = &L;
  struct Reset {
    ~Reset() {
      g_launch = nullptr;
      g_cur = nullptr;
    }
  } reset;
  ++g_counts[L.name];
  ++g_totals[L.name];
  check_launch(L);
  L.nthreads = static_cast<int>(block.x * block.y * block.z);
  while (g_stacks.size() < static_cast<size_t>(L.nthreads)) g_stacks.push_back(new_stack());
  g_fibers.resize(std::max(g_fibers.size(), static_cast<size_t>(L.nthreads)));
  for (int i = 0; i < L.nthreads; ++i) g_fibers[i].stack = g_stacks[i];
  L.fibers = &g_fibers;
  g_block_dim = block;
  g_grid_dim = grid;

  // The schedule: in "cycle" mode successive launches run threads (between barriers) and blocks forward,
  // reversed and shuffled in turn, so a rerun of an op sees other orders and an order-dependent result shows.
  const uint64_t no = g_launch_no++;
  Order o = g_order;
  if (o == Order::kCycle) o = static_cast<Order>(1 + no % 3);
  std::mt19937_64 rng(g_seed * 0x9e3779b97f4a7c15ull + no);
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> block_order(blocks);
  std::iota(block_order.begin(), block_order.end(), 0);
  if (o == Order::kReverse) std::reverse(block_order.begin(), block_order.end());
  if (o == Order::kShuffle) std::shuffle(block_order.begin(), block_order.end(), rng);
  for (const uint64_t b : block_order) {
    g_block_idx = {static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                   static_cast<unsigned>(b / (uint64_t(grid.x) * grid.y))};
    run_block(L, o, rng);
  }
}

void* block_shared(const void* tag, size_t bytes, size_t align) {
  TORCH_CHECK(g_cur != nullptr, "cuda-emu: shared memory declared outside a kernel");
  Launch& L = *g_launch;
  for (auto& [t, s] : L.shared) {
    if (t == tag) return s.get();
  }
  if (align > 16) kernel_fail("shared memory aligned to more than 16 bytes is not emulated");
  L.shared.emplace_back(tag, poisoned(bytes));
  L.static_smem += bytes;
  return L.shared.back().second.get();
}

unsigned char* block_dynamic_smem() {
  TORCH_CHECK(g_cur != nullptr, "cuda-emu: dynamic shared memory used outside a kernel");
  return static_cast<unsigned char*>(g_launch->dynamic.get());
}

void kernel_fail(const std::string& what) {
  TORCH_CHECK(g_cur != nullptr, "cuda-emu: ", what);
  g_launch->error = "cuda-emu: " + where() + " " + thread_name(*g_cur) + ": " + what;
  g_cur->state = State::kDone;
  switch_to_scheduler(true);
  __builtin_unreachable();
}

uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t bits, int arg, int width) {
  TORCH_CHECK(g_cur != nullptr, "cuda-emu: ", op_name(op), " called outside a kernel");
  Fiber& f = *g_cur;
  const int linear = static_cast<int>(f.tid.x + g_block_dim.x * (f.tid.y + g_block_dim.y * f.tid.z));
  const int lane = linear % kWarp, base = linear - lane;
  const int lanes = std::min(kWarp, g_launch->nthreads - base);
  if (!((mask >> lane) & 1u)) {
    kernel_fail(std::string(op_name(op)) + " with mask " + hex(mask) +
                ", which does not include its own lane " + std::to_string(lane));
  }
  if (lanes < kWarp && (mask >> lanes) != 0) {
    kernel_fail(std::string(op_name(op)) + " with mask " + hex(mask) + " names lanes " +
                std::to_string(lanes) + ".." + std::to_string(kWarp - 1) +
                ", which do not exist: the block has " + std::to_string(g_launch->nthreads) +
                " threads, so its last warp has " + std::to_string(lanes));
  }
  if (width < 1 || width > kWarp || (width & (width - 1)) != 0) {
    kernel_fail(std::string(op_name(op)) + " with width " + std::to_string(width) +
                ": not a power of two <= 32");
  }
  f.op = op;
  f.mask = mask;
  f.bits = bits;
  f.arg = arg;
  f.width = width;
  f.state = State::kWarp;
  switch_to_scheduler(false);
  return f.result;
}

void block_barrier() {
  TORCH_CHECK(g_cur != nullptr, "cuda-emu: __syncthreads called outside a kernel");
  g_cur->state = State::kBarrier;
  switch_to_scheduler(false);
}

void check_vector_access(const void* p, size_t bytes, size_t elem_bytes) {
  ++g_vector_bytes[log2_width(elem_bytes)][log2_width(bytes)];
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) {
    std::ostringstream s;
    s << "vector access of " << bytes << " bytes at " << p << ", which is not " << bytes << "-byte aligned";
    kernel_fail(s.str());
  }
}

int sm_count() { return g_profile->sms; }

int max_active_blocks_per_sm(const void*, int threads, size_t smem) {
  const Profile& p = *g_profile;
  const int warps = (threads + kWarp - 1) / kWarp;
  int blocks = std::min(p.blocks_per_sm, p.threads_per_sm / (warps * kWarp));
  blocks = std::min(blocks, p.regs_per_sm / (64 * warps * kWarp));
  if (smem > 0) blocks = std::min<int>(blocks, static_cast<int>(p.smem_per_sm / (smem + 1024)));
  return std::max(blocks, 0);
}

void allow_dynamic_smem(const void* kernel, size_t bytes) {
  std::lock_guard<std::mutex> lock(g_mutex);
  TORCH_CHECK(bytes <= g_profile->smem_optin, "cuda-emu: allow_dynamic_smem(", bytes, ") exceeds the ",
              g_profile->smem_optin, " bytes a block may have on ", g_profile->name);
  g_smem_optin[kernel] = bytes;
}

void bind_selftests(pybind11::module_& m);  // selftest.cpp

void bind_python(pybind11::module_& m) {
  namespace py = pybind11;
  m.attr("cuda_emulated") = true;
  bind_selftests(m);
  m.def(
      "emu_launch_counts",
      [] {
        std::lock_guard<std::mutex> lock(g_mutex);
        return g_counts;
      },
      "Launches per kernel (template instantiations counted under one name) since the last reset.");
  m.def(
      "emu_total_launch_counts",
      [] {
        std::lock_guard<std::mutex> lock(g_mutex);
        return g_totals;
      },
      "Launches per kernel since the library was loaded (what a coverage report counts).");
  m.def(
      "emu_vector_access_counts",
      [] {
        std::lock_guard<std::mutex> lock(g_mutex);
        std::map<std::pair<int, int>, uint64_t> r;
        for (int e = 0; e < kWidths; ++e) {
          for (int k = 0; k < kWidths; ++k) {
            if (g_vector_bytes[e][k] > 0) r[{1 << e, 1 << k}] = g_vector_bytes[e][k];
          }
        }
        return r;
      },
      "Vector loads and stores of the kernels (one-element ones included) since the last reset, keyed by "
      "(element bytes, access bytes).");
  m.def("emu_reset_launch_counts", [] {
    std::lock_guard<std::mutex> lock(g_mutex);
    g_counts.clear();
    for (auto& row : g_vector_bytes) std::fill(std::begin(row), std::end(row), 0);
  });
  m.def(
      "emu_set_schedule",
      [](const std::string& order, uint64_t seed) {
        std::lock_guard<std::mutex> lock(g_mutex);
        g_order = parse_order(order);
        g_seed = seed;
      },
      py::arg("order"), py::arg("seed") = 0,
      "Thread and block order: 'cycle' (forward, reverse, shuffled in turn per launch), 'forward', 'reverse' "
      "or 'shuffle'.");
  m.def("emu_schedule", [] {
    std::lock_guard<std::mutex> lock(g_mutex);
    return std::make_pair(std::string(order_name(g_order)), g_seed);
  });
  m.def(
      "emu_set_device",
      [](const std::string& name) {
        std::lock_guard<std::mutex> lock(g_mutex);
        for (const Profile& p : kProfiles) {
          if (name == p.name) {
            g_profile = &p;
            return;
          }
        }
        TORCH_CHECK(false, "cuda-emu: unknown device '", name, "' (H100, H200 or A100)");
      },
      "Which GPU the device queries answer for.");
  m.def("emu_device", [] { return std::string(g_profile->name); });
}

}  // namespace normext::emu
