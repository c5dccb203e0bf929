"""On-disk tensor formats, read without loading: dtypes by name (`dtypes`), safetensors headers and the
`StoredTensor` record (`stored_tensor`), lazy torch handles on stored tensors (`lazy_tensor`) and the restricted reader of
``torch.save`` zip files (`torch_zip`). See docs/checkpoint_formats.md.

Torch-free at import except `lazy_tensor`: the torch-free consolidation path uses `dtypes`, `stored_tensor` and `torch_zip`.
"""
