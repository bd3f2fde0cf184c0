// Bindings: flash attention (the Python wrapper in memkernels/attention.py allocates outputs).
#include "bind_common.h"

namespace memkernels::py {

static AttentionOptions make_options(bool causal, float scale, int window_left, int window_right, float softcap) {
  AttentionOptions o;
  o.causal = causal;
  o.scale = scale;
  o.window_left = window_left;
  o.window_right = window_right;
  o.softcap = softcap;
  return o;
}

MK_PYTHON_BINDING(attention) {
  m.def(
      "flash_attention",
      [](nb::handle q, nb::handle k, nb::handle v, nb::handle out, nb::handle lse, bool causal, float scale,
         int window_left, int window_right, float softcap, uintptr_t stream, nb::handle seqused_k,
         nb::handle key_mask) {
        ArrayKeeper keep;
        keep.reserve(7);
        TensorView tq = as_input(q, "q", keep), tk = as_input(k, "k", keep), tv = as_input(v, "v", keep);
        TensorView to = as_tensor(out, "out", keep);
        std::optional<TensorView> tl = as_optional_tensor(lse, "lse", keep);
        std::optional<TensorView> tu = as_optional_input(seqused_k, "seqused_k", keep);
        std::optional<TensorView> tm = as_optional_mask(key_mask, "key_mask", keep);
        AttentionOptions o = make_options(causal, scale, window_left, window_right, softcap);
        KeyPadding kp{tu ? &*tu : nullptr, tm ? &*tm : nullptr};
        nb::gil_scoped_release release;
        flash_attention(tq, tk, tv, to, tl ? &*tl : nullptr, o, kp, as_stream(stream));
      },
      nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("out"), nb::arg("lse").none(), nb::arg("causal"),
      nb::arg("scale"), nb::arg("window_left"), nb::arg("window_right"), nb::arg("softcap"), nb::arg("stream"),
      nb::arg("seqused_k").none() = nb::none(), nb::arg("key_mask").none() = nb::none());

  m.def(
      "flash_attention_varlen",
      [](nb::handle q, nb::handle k, nb::handle v, nb::handle cu_q, nb::handle cu_k, nb::handle out, nb::handle lse,
         int max_seqlen_q, bool causal, float scale, int window_left, int window_right, float softcap,
         uintptr_t stream, nb::handle seqused_k, nb::handle key_mask) {
        ArrayKeeper keep;
        keep.reserve(9);
        TensorView tq = as_input(q, "q", keep), tk = as_input(k, "k", keep), tv = as_input(v, "v", keep);
        TensorView tcq = as_input(cu_q, "cu_seqlens_q", keep), tck = as_input(cu_k, "cu_seqlens_k", keep);
        TensorView to = as_tensor(out, "out", keep);
        std::optional<TensorView> tl = as_optional_tensor(lse, "lse", keep);
        std::optional<TensorView> tu = as_optional_input(seqused_k, "seqused_k", keep);
        std::optional<TensorView> tm = as_optional_mask(key_mask, "key_mask", keep);
        AttentionOptions o = make_options(causal, scale, window_left, window_right, softcap);
        KeyPadding kp{tu ? &*tu : nullptr, tm ? &*tm : nullptr};
        nb::gil_scoped_release release;
        flash_attention_varlen(tq, tk, tv, tcq, tck, to, tl ? &*tl : nullptr, o, kp, max_seqlen_q,
                               as_stream(stream));
      },
      nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("cu_seqlens_q"), nb::arg("cu_seqlens_k"), nb::arg("out"),
      nb::arg("lse").none(), nb::arg("max_seqlen_q"), nb::arg("causal"), nb::arg("scale"), nb::arg("window_left"),
      nb::arg("window_right"), nb::arg("softcap"), nb::arg("stream"), nb::arg("seqused_k").none() = nb::none(),
      nb::arg("key_mask").none() = nb::none());
}

}  // namespace memkernels::py
