"""Public ops, one per file, all built on one template (copy it for a new op; `token_logprobs.py` is the
smallest complete example, `kl_penalty.py` the smallest reference-only one):

1. The public function (``rlhf_fast.<op>``) holds the spec in its docstring, validates every argument
   (``rlhf_fast/reference/<op>.py: validate`` or ``_validate``; errors name the argument), checks the
   ``backend`` argument's spelling with ``_backend.check_backend_arg`` and calls the custom op with
   the backend the caller asked for ("auto", "triton", "cuda" or "reference").
2. A ``torch.library.custom_op("rlhf_fast::<op>_fwd")`` whose schema carries ``backend: str`` resolves it
   inside (``_backend.resolve(_OP, backend, device, gpu=...)``, so "auto" is decided per call and
   ``extension_info()`` reports the choice) and runs either the kernel launcher (``_triton_forward``
   here, or the csrc binding) or ``reference.<op>.forward``. ``register_fake`` gives its shapes, so
   ``torch.compile(fullgraph=True)`` traces through every op.
3. Differentiable ops register an autograd formula (``register_autograd``) whose backward is a second
   custom op ``rlhf_fast::<op>_bwd`` dispatching the same way to ``_triton_backward`` or
   ``reference.<op>.backward``; the reference backward recomputes (chunked, or by autograd through the
   reference math) rather than saving (N, V) or (T, T) intermediates.
4. Launch helpers shared by several ops live in ``_launch.py`` (device guard, row-kernel config
   picker), ``_attention_launch.py`` and ``_fused_linear_launch.py``; kernel helpers in
   ``kernels/_*.py``. No op imports another op module.

The three hops: ``rlhf_fast/ops/<op>.py`` -> ``kernels/<op>.py`` (or ``csrc/``) ->
``rlhf_fast/reference/<op>.py``, tested in ``tests/test_<op>.py``.
"""
