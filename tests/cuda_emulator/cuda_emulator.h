#pragma once
// A CPU emulation of the part of CUDA that lookfast's kernels use (csrc/cuda/*.cu), so the CUDA kernels and their host
// code run in the CPU test suite, against the same float64 oracles as every other backend, on machines with no GPU.
// tests/cuda_emulator/build.py rewrites each .cu file into C++ (kernel<<<...>>>(args) -> launch(kernel, ..., args);
// extern __shared__ -> this block's dynamic shared memory) and compiles it with this header in place of the CUDA ones.
//
// Model: every CUDA thread of a block is a coroutine on one OS thread (a 20-instruction stack switch on x86-64, in
// control.cpp; ucontext elsewhere, ~30x slower: it makes a system call per switch); a thread runs until it reaches a
// barrier (__syncthreads, __syncwarp, a shuffle) or returns, and a barrier opens when every thread it waits for is
// there. What it checks, beyond the results the tests compare:
//   - __syncthreads reached by every thread of the block at the same call site (a barrier in divergent code, or one
//     that some threads skip by returning, is an error: undefined behaviour on a GPU);
//   - shuffles and __syncwarp with every lane of the warp present, lanes at the same shuffle site;
//   - wmma: every lane of a warp makes the same sequence of wmma calls (they are warp-collective), fragment pointers
//     32-byte aligned and leading dimensions multiples of 16 bytes (as the hardware requires);
//   - launches: grid and block sizes within the hardware's limits, dynamic shared memory within 48 KB unless
//     cudaFuncSetAttribute raised the kernel's limit, and never past the emulated GPU's opt-in maximum;
//   - dynamic shared memory starts as NaN bytes (0xFF) and writes past its end are reported;
//   - the order threads run between barriers is a setting (forward, reverse, shuffled): a kernel whose result depends
//     on it reads shared memory another thread writes without a barrier between (a race on a GPU).
// A wmma fragment is held by lane 0 of its warp, which does each fragment operation for the warp; the other lanes'
// calls are no-ops. That is exact for code that touches fragments only through the wmma API (lookfast's kernels do)
// and synchronises before reading what another lane stored, which the thread orders test.
#include <ucontext.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/mm.h>
#include <c10/core/Device.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

// ------------------------------------------------------------------------------------------------ CUDA vector types
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};

// ------------------------------------------------------------------------------------------- 16-bit floating types
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline __half __float2half_rn(float x) { return __half{c10::Half(x).x}; }  // c10 rounds to nearest even
inline float __half2float(__half h) { return static_cast<float>(c10::Half(h.bits, c10::Half::from_bits())); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) { return __nv_bfloat16{c10::BFloat16(x).x}; }
inline float __bfloat162float(__nv_bfloat16 b) {
  return static_cast<float>(c10::BFloat16(b.bits, c10::BFloat16::from_bits()));
}
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

namespace lookfast_emu {

[[noreturn]] inline void fail(const std::string& what) { throw std::runtime_error("CUDA emulator: " + what); }

// ------------------------------------------------------------------------------------------------ emulated device
struct Device {
  int major = 9;
  int optin_smem = 232448;  // sm_90 (H100 / H200): 227 KB per block
  int sms = 132;
};
inline Device device_for(int sm) {
  if (sm >= 90) return Device{9, 232448, 132};
  if (sm >= 80) return Device{8, 166912, 108};  // A100: 163 KB
  return Device{7, 65536, 40};                    // sm_75: no bf16 tensor cores, 64 KB
}

enum class State { kRunnable, kBlockBarrier, kWarpBarrier, kDone };

#if defined(__x86_64__)
// control.cpp: saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores the
// stack pointer in *save, and resumes the context whose stack pointer is `resume`.
extern "C" void lookfast_emu_switch(void** save, void* resume);
#endif

struct Thread {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  unsigned tid = 0;
  State state = State::kRunnable;
  int site = 0;                // the source line of the barrier it waits at
  bool shuffle = false;        // waits at a shuffle (lanes must agree on the site) rather than __syncwarp
  uint64_t exchange = 0;       // a shuffle's value
  uint64_t wmma_calls = 0;     // warp-collective calls made (every lane of a warp must make the same number)
};

struct Runtime {
  std::mutex mutex;            // one launch at a time (the coroutines share this state)
  Device device;
  int order = 0;               // 0 forward, 1 reverse, 2 shuffled (seeded per block)
  uint64_t seed = 0;
  uint64_t launches = 0;
  std::map<const void*, int> max_dynamic_smem;  // cudaFuncSetAttribute
#if defined(__x86_64__)
  void* scheduler = nullptr;
#else
  ucontext_t scheduler;
#endif
  std::vector<Thread> threads;
  std::vector<std::unique_ptr<char[]>> stacks;
  Thread* current = nullptr;
  dim3 grid, block, block_idx;
  unsigned char* smem = nullptr;
  std::function<void()> body;
  std::string error;
};
inline Runtime& rt() {
  static Runtime runtime;
  return runtime;
}
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kSmemGuard = 256;
constexpr unsigned kWarp = 32;

inline Thread& self() { return *rt().current; }
inline unsigned lane() { return self().tid % kWarp; }
inline uint3 thread_idx() {
  const Runtime& r = rt();
  const unsigned t = r.current->tid;
  return uint3{t % r.block.x, (t / r.block.x) % r.block.y, t / (r.block.x * r.block.y)};
}
inline uint3 block_idx() { return uint3{rt().block_idx.x, rt().block_idx.y, rt().block_idx.z}; }
inline uint3 block_dim() { return uint3{rt().block.x, rt().block.y, rt().block.z}; }
inline uint3 grid_dim() { return uint3{rt().grid.x, rt().grid.y, rt().grid.z}; }
inline unsigned char* dynamic_smem() { return rt().smem; }

inline void yield_to_scheduler() {
  Thread& t = self();
#if defined(__x86_64__)
  lookfast_emu_switch(&t.sp, rt().scheduler);
#else
  swapcontext(&t.ctx, &rt().scheduler);
#endif
}

inline void resume(Thread& t) {
  Runtime& r = rt();
  r.current = &t;
#if defined(__x86_64__)
  lookfast_emu_switch(&r.scheduler, t.sp);
#else
  swapcontext(&r.scheduler, &t.ctx);
#endif
  r.current = nullptr;
}

inline void sync_block(int line) {
  Thread& t = self();
  t.state = State::kBlockBarrier;
  t.site = line;
  yield_to_scheduler();
}

inline void sync_warp(int line, bool shuffle) {
  Thread& t = self();
  t.state = State::kWarpBarrier;
  t.site = line;
  t.shuffle = shuffle;
  yield_to_scheduler();
}

template <typename T>
T shfl_xor(int line, unsigned mask, T value, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable<T>::value, "shuffle of a wide type");
  if (mask != 0xffffffffu) fail("__shfl_xor_sync at line " + std::to_string(line) + " with a partial mask");
  if (width != 32 || lane_mask <= 0 || lane_mask >= 32) fail("__shfl_xor_sync lane mask out of range");
  Thread& t = self();
  std::memcpy(&t.exchange, &value, sizeof(T));
  sync_warp(line, true);
  const unsigned src = (t.tid - lane()) + (lane() ^ static_cast<unsigned>(lane_mask));
  if (src >= rt().threads.size()) fail("__shfl_xor_sync reads a lane past the block");
  T out;
  std::memcpy(&out, &rt().threads[src].exchange, sizeof(T));
  sync_warp(line, true);  // nobody overwrites its value before every lane has read
  return out;
}

inline void trampoline() {
  Runtime& r = rt();
  try {
    r.body();
  } catch (const std::exception& e) {
    if (r.error.empty()) r.error = e.what();
  } catch (...) {
    if (r.error.empty()) r.error = "unknown exception in a kernel";
  }
  r.current->state = State::kDone;
#if defined(__x86_64__)
  void* discard;
  lookfast_emu_switch(&discard, r.scheduler);  // never resumed
  __builtin_unreachable();
#endif
  // (ucontext) returning resumes uc_link: the scheduler
}

inline void start(Thread& t, char* stack) {
#if defined(__x86_64__)
  // a stack that `lookfast_emu_switch` resumes into trampoline() as if called: 16-byte aligned, a null return address
  // above its entry, zeroed callee-saved registers, and this thread's MXCSR / x87 control word
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + kStackBytes) & ~uintptr_t(15);
  auto push = [&top](uint64_t value) {
    top -= 8;
    *reinterpret_cast<uint64_t*>(top) = value;
  };
  push(0);                                              // trampoline's return address: none (it never returns)
  push(reinterpret_cast<uint64_t>(&trampoline));        // where the first switch "returns" to
  for (int i = 0; i < 6; ++i) push(0);                  // rbp, rbx, r12-r15
  uint32_t mxcsr;
  uint16_t fpu_cw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpu_cw));
  push(uint64_t(mxcsr) | uint64_t(fpu_cw) << 32);
  t.sp = reinterpret_cast<void*>(top);
#else
  getcontext(&t.ctx);
  t.ctx.uc_stack.ss_sp = stack;
  t.ctx.uc_stack.ss_size = kStackBytes;
  t.ctx.uc_link = &rt().scheduler;
  makecontext(&t.ctx, trampoline, 0);
#endif
}

inline std::string describe(const Thread& t) {
  return "thread " + std::to_string(t.tid) + " of block (" + std::to_string(rt().block_idx.x) + ", " +
         std::to_string(rt().block_idx.y) + ", " + std::to_string(rt().block_idx.z) + ")";
}

// Runs the current block's threads to completion, opening barriers as they fill; throws on divergence.
inline void run_block(unsigned nthreads) {
  Runtime& r = rt();
  r.threads.assign(nthreads, Thread{});
  while (r.stacks.size() < nthreads) r.stacks.emplace_back(new char[kStackBytes]);
  for (unsigned i = 0; i < nthreads; ++i) {
    r.threads[i].tid = i;
    start(r.threads[i], r.stacks[i].get());
  }
  std::vector<unsigned> order(nthreads);
  std::iota(order.begin(), order.end(), 0u);
  if (r.order == 1) std::reverse(order.begin(), order.end());
  std::mt19937_64 rng(r.seed ^ (r.launches * 0x9E3779B97F4A7C15ull) ^
                      (uint64_t(r.block_idx.x) << 32 | uint64_t(r.block_idx.y) << 16 | r.block_idx.z));
  for (;;) {
    if (r.order == 2) std::shuffle(order.begin(), order.end(), rng);
    for (unsigned i : order) {
      Thread& t = r.threads[i];
      if (t.state != State::kRunnable) continue;
      resume(t);
      if (!r.error.empty()) throw std::runtime_error(r.error + " (" + describe(t) + ")");
    }
    // nobody can run: open the barriers that are full
    bool opened = false;
    for (unsigned w = 0; w * kWarp < nthreads; ++w) {
      const unsigned lo = w * kWarp, hi = std::min(nthreads, lo + kWarp);
      unsigned waiting = 0, done = 0;
      for (unsigned i = lo; i < hi; ++i) {
        waiting += r.threads[i].state == State::kWarpBarrier;
        done += r.threads[i].state == State::kDone;
      }
      if (waiting == 0) continue;
      const Thread& first = r.threads[lo + (r.threads[lo].state == State::kWarpBarrier ? 0 : 1)];
      if (waiting != hi - lo) {
        const Thread* at = nullptr;
        for (unsigned i = lo; i < hi; ++i)
          if (r.threads[i].state == State::kWarpBarrier) at = &r.threads[i];
        const unsigned elsewhere = hi - lo - waiting - done;
        fail("warp " + std::to_string(w) + ": " + std::to_string(waiting) + " lanes wait at the warp barrier of line " +
             std::to_string(at->site) + (done ? ", " + std::to_string(done) + " have returned" : std::string()) +
             (elsewhere ? ", " + std::to_string(elsewhere) + " wait at a __syncthreads" : std::string()) + " (" +
             describe(*at) + ")");
      }
      for (unsigned i = lo; i < hi; ++i) {
        const Thread& t = r.threads[i];
        if (t.shuffle != first.shuffle || (t.shuffle && t.site != first.site))
          fail("warp " + std::to_string(w) + ": lanes at different shuffles or warp barriers (lines " +
               std::to_string(first.site) + " and " + std::to_string(t.site) + ")");
        if (t.wmma_calls != r.threads[lo].wmma_calls)
          fail("warp " + std::to_string(w) + ": lanes made different numbers of wmma calls (divergent wmma)");
      }
      for (unsigned i = lo; i < hi; ++i) r.threads[i].state = State::kRunnable;
      opened = true;
    }
    if (opened) continue;
    unsigned waiting = 0, done = 0;
    const Thread* at = nullptr;
    for (const Thread& t : r.threads) {
      if (t.state == State::kBlockBarrier) {
        ++waiting;
        if (at == nullptr) at = &t;
        if (t.site != at->site)
          fail("__syncthreads at lines " + std::to_string(at->site) + " and " + std::to_string(t.site) +
               " at once (a barrier in divergent code)");
      }
      done += t.state == State::kDone;
    }
    if (waiting == 0) break;  // every thread returned
    if (done != 0)
      fail("__syncthreads at line " + std::to_string(at->site) + " waits for " + std::to_string(done) +
           " threads that have returned (" + describe(*at) + ")");
    for (unsigned w = 0; w * kWarp < nthreads; ++w) {
      const unsigned lo = w * kWarp, hi = std::min(nthreads, lo + kWarp);
      for (unsigned i = lo; i < hi; ++i)
        if (r.threads[i].wmma_calls != r.threads[lo].wmma_calls)
          fail("warp " + std::to_string(w) + ": lanes made different numbers of wmma calls (divergent wmma)");
    }
    for (Thread& t : r.threads) t.state = State::kRunnable;
  }
  for (unsigned w = 0; w * kWarp < nthreads; ++w) {
    const unsigned lo = w * kWarp, hi = std::min(nthreads, lo + kWarp);
    for (unsigned i = lo; i < hi; ++i)
      if (r.threads[i].wmma_calls != r.threads[lo].wmma_calls)
        fail("warp " + std::to_string(w) + ": lanes made different numbers of wmma calls (divergent wmma)");
  }
}

template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem_bytes, const void* /*stream*/, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  Runtime& r = rt();
  std::lock_guard<std::mutex> lock(r.mutex);
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || nthreads == 0)
    fail("launch with an empty grid or block (cudaErrorInvalidConfiguration)");
  if (nthreads > 1024 || grid.y > 65535 || grid.z > 65535 || grid.x > 2147483647u)
    fail("launch past the grid / block limits (cudaErrorInvalidConfiguration)");
  const auto it = r.max_dynamic_smem.find(reinterpret_cast<const void*>(kernel));
  const size_t limit = it != r.max_dynamic_smem.end() ? size_t(it->second) : size_t(48 * 1024);
  if (smem_bytes > limit)
    fail("launch with " + std::to_string(smem_bytes) + " bytes of dynamic shared memory, over the kernel's limit of " +
         std::to_string(limit) + " (cudaFuncSetAttribute raises it)");
  std::tuple<std::decay_t<P>...> params(static_cast<P>(std::forward<A>(args))...);
  r.body = [&] { std::apply(kernel, params); };
  std::vector<unsigned char> smem(smem_bytes + kSmemGuard + 128);
  unsigned char* base = smem.data() + (128 - reinterpret_cast<uintptr_t>(smem.data()) % 128) % 128;
  ++r.launches;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        r.grid = grid;
        r.block = block;
        r.block_idx = dim3(x, y, z);
        std::memset(base, 0xFF, smem_bytes + kSmemGuard);
        r.smem = smem_bytes > 0 ? base : nullptr;
        r.error.clear();
        run_block(static_cast<unsigned>(nthreads));
        for (size_t i = 0; i < kSmemGuard; ++i)
          if (base[smem_bytes + i] != 0xFF)
            fail("a thread of block (" + std::to_string(x) + ", " + std::to_string(y) + ", " + std::to_string(z) +
                 ") wrote past the end of its " + std::to_string(smem_bytes) + " bytes of dynamic shared memory");
      }
  r.body = nullptr;
  r.smem = nullptr;
}

[[noreturn]] inline void trap() { fail("__trap() in a kernel"); }

// at::mm(a, b, out_dtype) on a GPU: cuBLAS's 16-bit GEMM with fp32 accumulation into an `out_dtype` result. ATen has
// it for CUDA only; the same math here: 16-bit products are exact in fp32, so upcast, multiply in fp32, round once.
// (Under CPU autocast an fp32 at::mm would run in bf16, which the GPU's mm.dtype never does: autocast is held off.)
inline at::Tensor mm_out_dtype(const at::Tensor& a, const at::Tensor& b, at::ScalarType out_dtype) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKeySet(c10::DispatchKey::AutocastCPU));
  return at::mm(a.to(at::kFloat), b.to(at::kFloat)).to(out_dtype);
}

}  // namespace lookfast_emu

#define threadIdx (::lookfast_emu::thread_idx())
#define blockIdx (::lookfast_emu::block_idx())
#define blockDim (::lookfast_emu::block_dim())
#define gridDim (::lookfast_emu::grid_dim())
#define __syncthreads() ::lookfast_emu::sync_block(__LINE__)
#define __syncwarp(...) ::lookfast_emu::sync_warp(__LINE__, false)
#define __shfl_xor_sync(...) ::lookfast_emu::shfl_xor(__LINE__, __VA_ARGS__)
#define __trap() ::lookfast_emu::trap()

// ------------------------------------------------------------------------------------------------- CUDA runtime
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerBlockOptin,
  cudaDevAttrComputeCapabilityMajor,
  cudaDevAttrMultiProcessorCount
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  const auto& d = ::lookfast_emu::rt().device;
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = d.optin_smem; break;
    case cudaDevAttrComputeCapabilityMajor: *value = d.major; break;
    case cudaDevAttrMultiProcessorCount: *value = d.sms; break;
  }
  return cudaSuccess;
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute, int value) {
  auto& r = ::lookfast_emu::rt();
  if (value < 0 || value > r.device.optin_smem) return cudaErrorInvalidValue;
  r.max_dynamic_smem[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}

#define C10_CUDA_CHECK(expr)                                                                                   \
  do {                                                                                                         \
    const cudaError_t lookfast_emu_err = (expr);                                                               \
    TORCH_CHECK(lookfast_emu_err == cudaSuccess, "CUDA error (emulated) ", int(lookfast_emu_err), " in " #expr); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
struct CUDAStream {
  operator const void*() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return CUDAStream{}; }
}  // namespace cuda
}  // namespace c10

// ------------------------------------------------------------------------------------------------------- wmma
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int cols = std::is_same<Use, matrix_a>::value ? K : N;
  T v[rows * cols];  // held by lane 0 of the warp (see the top of this file)
};

inline float to_float(__half x) { return __half2float(x); }
inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
inline float to_float(float x) { return x; }

// Counts the warp-collective call; true on the lane that does the work.
inline bool collective(const void* ptr, unsigned ldm, size_t elem_bytes, bool memory) {
  auto& t = ::lookfast_emu::self();
  ++t.wmma_calls;
  if (memory) {
    if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0)
      ::lookfast_emu::fail("wmma load/store at a pointer not 32-byte aligned");
    if ((ldm * elem_bytes) % 16 != 0) ::lookfast_emu::fail("wmma leading dimension not a multiple of 16 bytes");
  }
  return ::lookfast_emu::lane() == 0;
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same<Use, accumulator>::value, "an accumulator load names its layout");
  if (!collective(p, ldm, sizeof(T), true)) return;
  using F = fragment<Use, M, N, K, T, Layout>;
  const bool row = std::is_same<Layout, row_major>::value;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) f.v[r * F::cols + c] = row ? p[r * ldm + c] : p[c * ldm + r];
}
template <int M, int N, int K, typename T>
void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* p, unsigned ldm, layout_t layout) {
  if (!collective(p, ldm, sizeof(T), true)) return;
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) f.v[r * N + c] = layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
}
template <int M, int N, int K, typename T>
void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout) {
  if (!collective(p, ldm, sizeof(T), true)) return;
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.v[r * N + c];
}
template <typename Use, int M, int N, int K, typename T, typename Layout, typename V>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const V& value) {
  if (!collective(nullptr, 0, 0, false)) return;
  for (auto& x : f.v) x = static_cast<T>(value);
}
// d = a b + c: products of the 16-bit inputs exact in fp32, summed in fp32 (the tensor cores' order differs; the
// tests' tolerance covers that)
template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  if (!collective(nullptr, 0, 0, false)) return;
  float out[M * N];
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      float s = c.v[m * N + n];
      for (int k = 0; k < K; ++k) s += to_float(a.v[m * K + k]) * to_float(b.v[k * N + n]);
      out[m * N + n] = s;
    }
  std::memcpy(d.v, out, sizeof out);
}
}  // namespace wmma
}  // namespace nvcuda
