// The CUDA emulator's runtime (see cuda_emu.h): fibers and their scheduler, barriers and warp
// operations, fault reports, and a CPU allocator with guard pages around every buffer.
#include <c10/core/CPUAllocator.h>
#include <dlfcn.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <torch/extension.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <exception>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "cuda_emu.h"

extern "C" {
// Bounds of the section that holds every __shared__ variable (made by the linker).
extern char __start_afd_emu_shared[] __attribute__((weak));
extern char __stop_afd_emu_shared[] __attribute__((weak));
}

namespace afd_emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 64 * 1024;  // PROT_NONE on each side of a buffer and below each stack
constexpr int kMaxThreadsPerBlock = 1024;

size_t page_bytes() {
  static const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return page;
}

size_t round_up(size_t n, size_t m) { return (n + m - 1) / m * m; }

// ---------------------------------------------------------------------------------------------
// Settings and counters
// ---------------------------------------------------------------------------------------------
std::mt19937_64 g_rng(0);
cudaDeviceProp g_props{2, 32, kMaxThreadsPerBlock, 48 * 1024};
struct Counters {
  int64_t launches = 0, blocks = 0, switches = 0;
} g_counters;

// ---------------------------------------------------------------------------------------------
// Fibers
// ---------------------------------------------------------------------------------------------
enum class State { Runnable, AtBarrier, AtWarpOp, Done };

struct Thread {
  ucontext_t context;
  char* stack = nullptr;  // kStackBytes above a guard of kGuardBytes
  uint3 idx{0, 0, 0};
  int warp = 0, lane = 0;
  State state = State::Runnable;
  const char* file = "";  // where it waits
  int line = 0;
  WarpOp op = WarpOp::Sync;
  unsigned mask = 0;
  int arg = 0, width = 32;
  size_t size = 0;
  unsigned char in[16], out[16];
};

struct Block {
  uint3 idx{0, 0, 0};
  dim3 dim, grid;
  int threads = 0;
};

std::vector<Thread> g_threads;  // the current block's threads; stacks are kept between launches
std::vector<int> g_order;
Block g_block;
const LaunchConfig* g_config = nullptr;
const std::function<void()>* g_body = nullptr;
std::exception_ptr g_thread_error;
ucontext_t g_scheduler;
thread_local Thread* g_current = nullptr;

void fiber_main() {
  Thread* self = g_current;
  try {
    (*g_body)();
  } catch (...) {
    if (!g_thread_error) g_thread_error = std::current_exception();
  }
  self->state = State::Done;
  swapcontext(&self->context, &g_scheduler);
}

void ensure_stacks(int threads) {
  if (static_cast<int>(g_threads.size()) >= threads) return;
  const size_t old = g_threads.size();
  g_threads.resize(threads);
  for (size_t i = old; i < g_threads.size(); ++i) {
    void* base = mmap(nullptr, kGuardBytes + kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(base != MAP_FAILED, "cuda_emu: cannot map a fiber stack");
    mprotect(base, kGuardBytes, PROT_NONE);
    g_threads[i].stack = static_cast<char*>(base) + kGuardBytes;
  }
}

void resume(Thread& t) {
  g_current = &t;
  ++g_counters.switches;
  swapcontext(&g_scheduler, &t.context);
  g_current = nullptr;
}

void yield(Thread& t) { swapcontext(&t.context, &g_scheduler); }

Thread& current_thread(const char* what) {
  TORCH_CHECK(g_current != nullptr, "cuda_emu: ", what, " called outside an emulated kernel");
  return *g_current;
}

// ---------------------------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------------------------
std::string dim_str(unsigned x, unsigned y, unsigned z) {
  std::ostringstream s;
  s << "(" << x << "," << y << "," << z << ")";
  return s.str();
}

std::string ranges(const std::vector<int>& items) {  // 0,1,2,5 -> "0-2, 5"
  std::ostringstream s;
  for (size_t i = 0; i < items.size();) {
    size_t j = i;
    while (j + 1 < items.size() && items[j + 1] == items[j] + 1) ++j;
    s << (i ? ", " : "") << items[i];
    if (j > i) s << "-" << items[j];
    i = j + 1;
  }
  return s.str();
}

std::string launch_place() {
  std::ostringstream s;
  s << "kernel launched at " << g_config->file << ":" << g_config->line << " (in " << g_config->caller << "), grid "
    << dim_str(g_block.grid.x, g_block.grid.y, g_block.grid.z) << ", block "
    << dim_str(g_block.dim.x, g_block.dim.y, g_block.dim.z) << ", in block "
    << dim_str(g_block.idx.x, g_block.idx.y, g_block.idx.z);
  return s.str();
}

std::string waiting_at(const Thread& t) {
  std::ostringstream s;
  if (t.state == State::AtBarrier) {
    s << "__syncthreads() at " << t.file << ":" << t.line;
  } else if (t.state == State::AtWarpOp) {
    char mask[16];
    std::snprintf(mask, sizeof(mask), "0x%08x", t.mask);
    s << warp_op_name(t.op) << "(mask " << mask << ") at " << t.file << ":" << t.line;
  } else if (t.state == State::Done) {
    s << "returned from the kernel";
  } else {
    s << "running";
  }
  return s.str();
}

// Groups the threads (or the lanes of one warp) by where they are.
std::string where_threads_are(int first, int last, bool as_lanes) {
  std::map<std::string, std::vector<int>> groups;
  for (int i = first; i < last; ++i) groups[waiting_at(g_threads[i])].push_back(as_lanes ? i - first : i);
  std::ostringstream s;
  for (const auto& g : groups) s << "\n    " << (as_lanes ? "lanes " : "threads ") << ranges(g.second) << ": " << g.first;
  return s.str();
}

[[noreturn]] void stalled() {
  std::ostringstream s;
  s << "cuda_emu: the kernel would hang or misbehave on a GPU: " << launch_place()
    << ", no thread can go on.";
  int stuck_warps = 0;
  for (int w = 0; w * 32 < g_block.threads; ++w) {
    const int first = w * 32, last = std::min(first + 32, g_block.threads);
    bool waits = false;
    for (int i = first; i < last; ++i) waits |= g_threads[i].state == State::AtWarpOp;
    if (waits && ++stuck_warps <= 2) s << "\n  warp " << w << ":" << where_threads_are(first, last, true);
  }
  if (stuck_warps > 2) s << "\n  (and " << stuck_warps - 2 << " more warps)";
  if (stuck_warps) s << "\n  Every lane named in a warp operation's mask must call the same operation at the same place.";
  s << "\n  threads of the block:" << where_threads_are(0, g_block.threads, false)
    << "\n  A __syncthreads() must be reached by every thread of the block.";
  throw std::runtime_error(s.str());
}

// ---------------------------------------------------------------------------------------------
// Synchronisation
// ---------------------------------------------------------------------------------------------
bool same_place(const Thread& a, const Thread& b) {
  return a.line == b.line && std::strcmp(a.file, b.file) == 0;
}

// Releases the block's barrier once every thread waits at it.
void try_release_barrier(int waiting) {
  const int n = g_block.threads;
  if (waiting < n) return;
  for (int i = 1; i < n; ++i) {
    TORCH_CHECK(same_place(g_threads[i], g_threads[0]), "cuda_emu: the threads of a block wait at different "
                "__syncthreads() calls: ", launch_place(), where_threads_are(0, n, false));
  }
  for (int i = 0; i < n; ++i) g_threads[i].state = State::Runnable;
}

int source_lane(const Thread& t) {
  const int w = t.width, lane = t.lane, base = lane & ~(w - 1);
  switch (t.op) {
    case WarpOp::ShflIdx: return base + (((t.arg % w) + w) % w);
    case WarpOp::ShflUp: return lane - base >= t.arg ? lane - t.arg : lane;
    case WarpOp::ShflDown: return lane - base + t.arg < w ? lane + t.arg : lane;
    case WarpOp::ShflXor: {
      const int src = lane ^ t.arg;
      return src >= base + w ? lane : src;  // later groups of `width` lanes are out of reach
    }
    case WarpOp::Sync: return lane;
  }
  return lane;
}

// Completes the warp operation `t` waits at once every lane of its mask has arrived there.
void try_release_warp_op(const Thread& t) {
  const int first = t.warp * 32, lanes = std::min(32, g_block.threads - first);
  Thread* warp = &g_threads[first];
  const unsigned mask = t.mask;
  TORCH_CHECK((mask >> t.lane) & 1u, "cuda_emu: lane ", t.lane, " calls ", warp_op_name(t.op), " at ", t.file, ":",
              t.line, " with a mask that leaves itself out: ", launch_place());
  TORCH_CHECK(lanes == 32 || (mask >> lanes) == 0u, "cuda_emu: ", warp_op_name(t.op), " at ", t.file, ":", t.line,
              " names lanes beyond the ", lanes, " lanes of this warp: ", launch_place());
  TORCH_CHECK(t.width >= 1 && t.width <= 32 && (t.width & (t.width - 1)) == 0, "cuda_emu: width ", t.width, " of ",
              warp_op_name(t.op), " at ", t.file, ":", t.line, " is not a power of two up to 32");
  for (int j = 0; j < lanes; ++j) {
    if (!((mask >> j) & 1u)) continue;
    const Thread& u = warp[j];
    if (u.state != State::AtWarpOp || u.op != t.op || u.mask != mask || !same_place(u, t)) return;
  }
  for (int j = 0; j < lanes; ++j) {
    if (!((mask >> j) & 1u)) continue;
    Thread& u = warp[j];
    const int src = source_lane(u);
    TORCH_CHECK(src < lanes && ((mask >> src) & 1u), "cuda_emu: lane ", j, " of ", warp_op_name(u.op), " at ", u.file,
                ":", u.line, " reads lane ", src, ", which is not in the mask: ", launch_place());
    TORCH_CHECK(warp[src].size == u.size, "cuda_emu: lanes shuffle values of different sizes at ", u.file, ":", u.line);
    std::memcpy(u.out, warp[src].in, u.size);
  }
  for (int j = 0; j < lanes; ++j)
    if ((mask >> j) & 1u) warp[j].state = State::Runnable;
}

void poison_shared_memory() {
  if (__start_afd_emu_shared != nullptr && __stop_afd_emu_shared != nullptr)
    std::memset(__start_afd_emu_shared, 0xFF, static_cast<size_t>(__stop_afd_emu_shared - __start_afd_emu_shared));
}

// Which runnable thread goes next. Per block the generator picks one of two orders: any runnable
// thread at random (fine interleavings), or warps by a random priority, the first warp that can go
// on running as far as it can (one warp races ahead of the others, e.g. into the next use of
// shared memory that the others still read). Synchronisation completes as soon as its last
// thread arrives, so released threads may run before threads that have not moved yet.
int pick_next(bool by_warp_priority, const std::vector<int>& warp_priority) {
  g_order.clear();
  if (by_warp_priority) {
    for (int w : warp_priority) {
      const int first = w * 32, last = std::min(first + 32, g_block.threads);
      for (int i = first; i < last; ++i)
        if (g_threads[i].state == State::Runnable) g_order.push_back(i);
      if (!g_order.empty()) break;
    }
  } else {
    for (int i = 0; i < g_block.threads; ++i)
      if (g_threads[i].state == State::Runnable) g_order.push_back(i);
  }
  if (g_order.empty()) return -1;
  return g_order[std::uniform_int_distribution<size_t>(0, g_order.size() - 1)(g_rng)];
}

void run_block(const uint3& block_index) {
  g_block.idx = block_index;
  poison_shared_memory();
  const dim3 d = g_block.dim;
  for (int i = 0; i < g_block.threads; ++i) {
    Thread& t = g_threads[i];
    t.idx = {i % d.x, (i / d.x) % d.y, i / (d.x * d.y)};
    t.warp = i / 32;
    t.lane = i % 32;
    t.state = State::Runnable;
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = t.stack;
    t.context.uc_stack.ss_size = kStackBytes;
    t.context.uc_link = nullptr;
    makecontext(&t.context, fiber_main, 0);
  }
  std::vector<int> warp_priority((g_block.threads + 31) / 32);
  for (size_t w = 0; w < warp_priority.size(); ++w) warp_priority[w] = static_cast<int>(w);
  std::shuffle(warp_priority.begin(), warp_priority.end(), g_rng);
  const bool by_warp_priority = g_rng() % 2 == 0;
  int done = 0, at_barrier = 0;
  for (;;) {
    const int next = pick_next(by_warp_priority, warp_priority);
    if (next < 0) {
      if (done == g_block.threads) return;
      stalled();
    }
    Thread& t = g_threads[next];
    resume(t);
    if (g_thread_error) std::rethrow_exception(g_thread_error);
    if (t.state == State::Done) {
      ++done;
    } else if (t.state == State::AtBarrier) {
      try_release_barrier(++at_barrier);
      if (t.state == State::Runnable) at_barrier = 0;
    } else if (t.state == State::AtWarpOp) {
      try_release_warp_op(t);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Guarded allocations and fault reports
// ---------------------------------------------------------------------------------------------
enum class GuardMode { Off, End, Start };
GuardMode g_guard_mode = GuardMode::Off;

struct Allocation {
  uintptr_t map_begin, map_end, data;
  size_t bytes;
  int64_t id;
};
std::mutex g_alloc_mutex;
std::map<uintptr_t, Allocation> g_allocations;  // by map_begin
int64_t g_next_id = 0;

void free_guarded(void* ctx) {
  auto* a = static_cast<Allocation*>(ctx);
  {
    std::lock_guard<std::mutex> lock(g_alloc_mutex);
    g_allocations.erase(a->map_begin);
  }
  munmap(reinterpret_cast<void*>(a->map_begin), a->map_end - a->map_begin);
  delete a;
}

// Every buffer in its own mapping between PROT_NONE guards, flush against the guard after it
// (End: catches reads and writes past the end) or before it (Start: catches those before the
// start). New memory is filled with 0xFF, NaN in every float type, so an output element that a
// kernel forgets to write shows.
class GuardAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    const size_t data_bytes = round_up(std::max<size_t>(n, 1), page_bytes());
    const size_t total = kGuardBytes + data_bytes + kGuardBytes;
    void* base = mmap(nullptr, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(base != MAP_FAILED, "cuda_emu: cannot map a guarded buffer of ", n, " bytes");
    char* begin = static_cast<char*>(base) + kGuardBytes;
    TORCH_CHECK(mprotect(begin, data_bytes, PROT_READ | PROT_WRITE) == 0, "cuda_emu: mprotect failed");
    std::memset(begin, 0xFF, data_bytes);
    char* data = g_guard_mode == GuardMode::Start ? begin : begin + data_bytes - n;
    auto* a = new Allocation{reinterpret_cast<uintptr_t>(base), reinterpret_cast<uintptr_t>(base) + total,
                             reinterpret_cast<uintptr_t>(data), n, 0};
    {
      std::lock_guard<std::mutex> lock(g_alloc_mutex);
      a->id = g_next_id++;
      g_allocations[a->map_begin] = *a;
    }
    return {data, a, &free_guarded, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

GuardAllocator g_guard_allocator;
c10::Allocator* g_previous_allocator = nullptr;

void set_guard_mode(const std::string& mode) {
  TORCH_CHECK(mode == "off" || mode == "end" || mode == "start", "cuda_emu: guard mode is off, end or start, got ",
              mode);
  if (mode == "off") {
    if (g_previous_allocator != nullptr) c10::SetCPUAllocator(g_previous_allocator, 255);
    g_previous_allocator = nullptr;
    g_guard_mode = GuardMode::Off;
    return;
  }
  if (g_previous_allocator == nullptr) {
    g_previous_allocator = c10::GetCPUAllocator();
    c10::SetCPUAllocator(&g_guard_allocator, 255);
  }
  g_guard_mode = mode == "end" ? GuardMode::End : GuardMode::Start;
}

struct Fault {
  int signal;
  uintptr_t address, instruction;
  uint3 thread;
  bool in_thread;
};
Fault g_fault;
sigjmp_buf g_fault_jump;
volatile sig_atomic_t g_in_launch = 0;
struct sigaction g_old_segv, g_old_bus, g_old_ill;
std::vector<char> g_signal_stack;

void on_fault(int sig, siginfo_t* info, void* context) {
  if (!g_in_launch) {  // not ours: the previous handler or the default action
    sigaction(SIGSEGV, &g_old_segv, nullptr);
    sigaction(SIGBUS, &g_old_bus, nullptr);
    sigaction(SIGILL, &g_old_ill, nullptr);
    return;  // the instruction faults again under the old handler
  }
  g_fault.signal = sig;
  g_fault.address = reinterpret_cast<uintptr_t>(info->si_addr);
#if defined(__x86_64__)
  g_fault.instruction = static_cast<uintptr_t>(static_cast<ucontext_t*>(context)->uc_mcontext.gregs[REG_RIP]);
#elif defined(__aarch64__)
  g_fault.instruction = static_cast<uintptr_t>(static_cast<ucontext_t*>(context)->uc_mcontext.pc);
#else
  (void)context;
  g_fault.instruction = 0;
#endif
  g_fault.in_thread = g_current != nullptr;
  if (g_current) g_fault.thread = g_current->idx;
  siglongjmp(g_fault_jump, 1);
}

std::string describe_address(uintptr_t addr) {
  std::ostringstream s;
  {
    std::lock_guard<std::mutex> lock(g_alloc_mutex);
    auto it = g_allocations.upper_bound(addr);
    if (it != g_allocations.begin()) {
      const Allocation& a = std::prev(it)->second;
      if (addr >= a.map_begin && addr < a.map_end) {
        if (addr < a.data) {
          s << (a.data - addr) << " bytes before the start of a " << a.bytes << "-byte buffer (allocation #" << a.id << ")";
        } else if (addr >= a.data + a.bytes) {
          s << (addr - a.data - a.bytes) << " bytes past the end of a " << a.bytes << "-byte buffer (allocation #"
            << a.id << ", offset " << (addr - a.data) << ")";
        } else {
          s << "inside a " << a.bytes << "-byte buffer at offset " << (addr - a.data);
        }
        return s.str();
      }
    }
  }
  for (const Thread& t : g_threads) {
    const uintptr_t guard = reinterpret_cast<uintptr_t>(t.stack) - kGuardBytes;
    if (addr >= guard && addr < guard + kGuardBytes) return "the guard below an emulated thread's stack (stack overflow)";
  }
  if (addr == 0 && g_fault.signal == SIGSEGV)
    return "no address reported (a general-protection fault: e.g. a misaligned 16-byte vector load)";
  char buf[64];
  std::snprintf(buf, sizeof(buf), "0x%lx, in no emulated buffer", static_cast<unsigned long>(addr));
  return buf;
}

// The source line of the faulting instruction, from the debug information (needs addr2line).
std::string source_of(uintptr_t instruction) {
  Dl_info info;
  if (instruction == 0 || dladdr(reinterpret_cast<void*>(instruction), &info) == 0 || info.dli_fname == nullptr) return "";
  char cmd[1024];
  std::snprintf(cmd, sizeof(cmd), "addr2line -C -i -e '%s' 0x%lx 2>/dev/null", info.dli_fname,
                static_cast<unsigned long>(instruction - reinterpret_cast<uintptr_t>(info.dli_fbase)));
  FILE* p = popen(cmd, "r");
  if (p == nullptr) return "";
  std::string out;
  char line[512];
  while (std::fgets(line, sizeof(line), p)) out += std::string("\n    at ") + line;
  pclose(p);
  while (!out.empty() && (out.back() == '\n')) out.pop_back();
  return out;
}

[[noreturn]] void report_fault() {
  std::ostringstream s;
  const std::string who =
      g_fault.in_thread ? "thread " + dim_str(g_fault.thread.x, g_fault.thread.y, g_fault.thread.z) : "the scheduler";
  if (g_fault.signal == SIGILL) {  // a trap of the build's -fsanitize=alignment,bounds checks
    s << "cuda_emu: misaligned or out-of-bounds access (an undefined-behaviour check trapped) by " << who << " of the "
      << launch_place() << ": a typed load or store from an address not aligned for its type (e.g. a 16-byte "
      << "vector load), or an index outside a fixed-size array (e.g. __shared__ memory)";
  } else {
    s << "cuda_emu: invalid memory access (" << (g_fault.signal == SIGBUS ? "SIGBUS" : "SIGSEGV") << ") by " << who
      << " of the " << launch_place() << ": " << describe_address(g_fault.address);
  }
  s << source_of(g_fault.instruction);
  throw std::runtime_error(s.str());
}

struct FaultHandlers {
  FaultHandlers() {
    if (g_signal_stack.empty()) g_signal_stack.resize(256 * 1024);
    stack_t ss{};
    ss.ss_sp = g_signal_stack.data();
    ss.ss_size = g_signal_stack.size();
    sigaltstack(&ss, &old_stack);
    struct sigaction sa{};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_old_segv);
    sigaction(SIGBUS, &sa, &g_old_bus);
    sigaction(SIGILL, &sa, &g_old_ill);
  }
  ~FaultHandlers() {
    sigaction(SIGSEGV, &g_old_segv, nullptr);
    sigaction(SIGBUS, &g_old_bus, nullptr);
    sigaction(SIGILL, &g_old_ill, nullptr);
    sigaltstack(&old_stack, nullptr);
  }
  stack_t old_stack{};
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// Entry points of cuda_emu.h
// ---------------------------------------------------------------------------------------------
const uint3& thread_idx() { return current_thread("threadIdx").idx; }
const uint3& block_idx() {
  current_thread("blockIdx");
  return g_block.idx;
}
const dim3& block_dim() {
  current_thread("blockDim");
  return g_block.dim;
}
const dim3& grid_dim() {
  current_thread("gridDim");
  return g_block.grid;
}
const cudaDeviceProp& device_properties() { return g_props; }

void scheduling_point() {
  if (g_current != nullptr) yield(*g_current);
}

void block_barrier(const char* file, int line) {
  Thread& t = current_thread("__syncthreads");
  t.state = State::AtBarrier;
  t.file = file;
  t.line = line;
  yield(t);
}

const char* warp_op_name(WarpOp op) {
  switch (op) {
    case WarpOp::Sync: return "__syncwarp";
    case WarpOp::ShflIdx: return "__shfl_sync";
    case WarpOp::ShflUp: return "__shfl_up_sync";
    case WarpOp::ShflDown: return "__shfl_down_sync";
    case WarpOp::ShflXor: return "__shfl_xor_sync";
  }
  return "?";
}

void warp_exchange(WarpOp op, unsigned mask, const void* in, void* out, size_t size, int arg, int width,
                   const char* file, int line) {
  Thread& t = current_thread(warp_op_name(op));
  t.state = State::AtWarpOp;
  t.op = op;
  t.mask = mask;
  t.arg = arg;
  t.width = width;
  t.size = size;
  t.file = file;
  t.line = line;
  std::memcpy(t.in, in, size);
  yield(t);
  std::memcpy(out, t.out, size);
}

void launch(const LaunchConfig& config, const std::function<void()>& thread_body) {
  const dim3 g = config.grid, b = config.block;
  const int64_t threads = int64_t(b.x) * b.y * b.z;
  TORCH_CHECK(g_in_launch == 0, "cuda_emu: a kernel launched from inside a kernel (not emulated)");
  TORCH_CHECK(threads >= 1 && threads <= kMaxThreadsPerBlock && b.x <= 1024 && b.y <= 1024 && b.z <= 64 && g.x >= 1 &&
                  g.x <= 2147483647u && g.y >= 1 && g.y <= 65535 && g.z >= 1 && g.z <= 65535 &&
                  config.shared_bytes <= g_props.sharedMemPerBlock,
              "cuda_emu: invalid configuration argument (a GPU refuses this launch) at ", config.file, ":", config.line,
              ": grid ", dim_str(g.x, g.y, g.z), ", block ", dim_str(b.x, b.y, b.z), ", ", config.shared_bytes,
              " bytes of dynamic shared memory");
  ensure_stacks(static_cast<int>(threads));
  std::vector<uint3> blocks;
  for (unsigned z = 0; z < g.z; ++z)
    for (unsigned y = 0; y < g.y; ++y)
      for (unsigned x = 0; x < g.x; ++x) blocks.push_back({x, y, z});
  std::shuffle(blocks.begin(), blocks.end(), g_rng);
  g_config = &config;
  g_body = &thread_body;
  g_thread_error = nullptr;
  g_block.dim = b;
  g_block.grid = g;
  g_block.threads = static_cast<int>(threads);
  ++g_counters.launches;

  FaultHandlers handlers;
  struct InLaunch {
    InLaunch() { g_in_launch = 1; }
    ~InLaunch() {
      g_in_launch = 0;
      g_current = nullptr;
    }
  } in_launch;
  if (sigsetjmp(g_fault_jump, 1) != 0) report_fault();
  for (const uint3& block : blocks) {
    run_block(block);
    ++g_counters.blocks;
  }
}

}  // namespace afd_emu

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t) {
  std::memset(ptr, value, count);
  return cudaSuccess;
}
cudaError_t cudaGetLastError() { return cudaSuccess; }  // bad launches throw at the launch
const char* cudaGetErrorString(cudaError_t error) { return error == cudaSuccess ? "no error" : "invalid value"; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "afd_fast's kernels under the CPU emulation of the CUDA execution model (tests/cuda_emu)";
  m.def("set_seed", [](uint64_t seed) { afd_emu::g_rng.seed(seed); },
        "seed of the shuffled order of blocks and of threads between synchronisation points");
  m.def("set_sm_count", [](int count) {
    TORCH_CHECK(count >= 1, "cuda_emu: the SM count must be >= 1");
    afd_emu::g_props.multiProcessorCount = count;
  }, "multiProcessorCount the kernels see (small values make grid-stride loops go round)");
  m.def("set_guard_mode", &afd_emu::set_guard_mode,
        "'end' or 'start': new CPU tensors get guard pages after or before them; 'off': torch's allocator");
  m.def("counters", [] {
    return std::map<std::string, int64_t>{{"launches", afd_emu::g_counters.launches},
                                          {"blocks", afd_emu::g_counters.blocks},
                                          {"switches", afd_emu::g_counters.switches}};
  });
}
