// A diagnostic for benchmarks/convdraw_parts.py: an XLA FFI handler with the
// signature of geco_jax/ops/onednn_conv.cc's three convolution handlers
// (two float32 operands, one float32 result) that does no work at all. Its
// result keeps whatever the buffer held: a step that calls it computes
// nothing meaningful, and times everything but the convolutions it replaces.
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

static ffi::Error Skip(ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>, ffi::ResultBuffer<ffi::F32>) {
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(GecoBenchmarkSkipConv, Skip,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
