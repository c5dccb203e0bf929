"""On-disk tensor formats, read without loading: dtypes by name (`dtypes`), safetensors headers and the
`StoredTensor` record (`stored`), lazy torch handles on stored tensors (`lazy`) and the restricted reader of
``torch.save`` zip files (`torch_zip`). See docs/checkpoint_formats.md.

Torch-free at import except `lazy`: the torch-free consolidation path uses `dtypes`, `stored` and `torch_zip`.
"""
