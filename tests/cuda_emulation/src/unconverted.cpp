// CUDA emulation build: entry points of the cuda/ files not yet converted to the launch and PTX
// wrappers (they still use <<<>>> and inline asm, which a host compiler cannot read). Calling one on
// an emulated "CUDA" device raises NotImplemented naming the file; the normal build never has this.
// Remove a group once its file compiles in the emulation build (see tests/cuda_emulation/README.md).
#include <string>

#include "attention_internal.h"
#include "quant_internal.h"

namespace memkernels::cuda_backend {
namespace {
[[noreturn]] void not_converted(const char* op, const char* file) {
  throw_error(ErrorKind::NotImplemented, std::string(op) + ": " + file +
                                             " is not yet converted to the CUDA emulation build (launch_kernel, PTX wrappers)");
}
}  // namespace

void qgemm(const QGemmProblem&, void*) { not_converted("qgemm", "cuda/qgemm.cu"); }
void dequantize(const DequantProblem&, void*) { not_converted("dequantize", "cuda/qgemm.cu"); }

}  // namespace memkernels::cuda_backend
