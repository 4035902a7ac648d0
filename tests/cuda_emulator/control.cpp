// The emulator's settings, as an op the tests call: the emulated GPU's compute capability (90, 80 or 75: shared
// memory and the tensor-core path follow it) and the order threads run between barriers (0 forward, 1 reverse,
// 2 shuffled with `seed`). See cuda_emulator.h.
#include <torch/library.h>

#include "cuda_emulator.h"

#if defined(__x86_64__)
// lookfast_emu_switch(void** save, void* resume) (System V ABI: rdi, rsi): the emulator's coroutine switch.
asm(R"(
    .text
    .globl lookfast_emu_switch
    .type lookfast_emu_switch, @function
lookfast_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size lookfast_emu_switch, .-lookfast_emu_switch
)");
#endif

namespace {
void configure(int64_t sm, int64_t order, int64_t seed) {
  TORCH_CHECK(sm == 75 || sm == 80 || sm == 90, "emulator_configure: sm must be 75, 80 or 90, got ", sm);
  TORCH_CHECK(order >= 0 && order <= 2, "emulator_configure: order must be 0, 1 or 2, got ", order);
  auto& r = lookfast_emu::rt();
  std::lock_guard<std::mutex> lock(r.mutex);
  r.device = lookfast_emu::device_for(static_cast<int>(sm));
  r.order = static_cast<int>(order);
  r.seed = static_cast<uint64_t>(seed);
  r.max_dynamic_smem.clear();  // as on a fresh process: attributes belong to a device
}
int64_t launches() { return static_cast<int64_t>(lookfast_emu::rt().launches); }
}  // namespace

TORCH_LIBRARY(lookfast_cuda_emu_control, m) {
  m.def("configure(int sm, int order, int seed) -> ()", &configure);
  m.def("launches() -> int", &launches);
}
