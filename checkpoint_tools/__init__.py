"""Hugging Face Llama ⇄ megarank (megatron-core torch_dist) checkpoint converters.

    megarank-convert hf-to-megatron  SRC_HF  DST_MEGARANK     # or: python -m checkpoint_tools ...
    megarank-convert megatron-to-hf  SRC_MEGARANK  DST_HF
    megarank-convert verify          SRC_HF  DST_MEGARANK

Both directions stream one tensor at a time (see hf_reader, megatron_writer, megatron_reader, hf_writer), so peak
memory is about the largest single tensor, not the model. Nothing here imports megarank.training.
"""
