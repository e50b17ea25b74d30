"""The Freeze-Omni model. Variants:

- ``freeze_omni``: the released model's real dimensions (Qwen2-7B-Instruct backbone, encoder
  1024 x 24, speech decoder 896, TiCodec 24 kHz / 40 Hz).
- ``qwen2_0_5b``: the same speech parts around a Qwen2-0.5B-shaped LLM (benchmarks, small GPUs).
- ``tiny``: a few-second CPU model for tests and notebooks (float32).
- ``toy``: the full toy world's model (``fo-jax toy``): tiny with a 128 x 4 encoder (32-channel
  subsampling convs), a 128-wide LLM and a 128 x 2 speech decoder.
"""

import ml_collections


def _freeze_omni() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "model": {
            "llm": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                        num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6,
                        tie_word_embeddings=False, max_position_embeddings=32768,
                        eos_token_ids=(151645, 151643), dtype="bfloat16", param_dtype="bfloat16"),
            "encoder": dict(input_dim=80, hidden_size=1024, num_layers=24, num_heads=16, ffn_size=4096,
                            subsampling_channels=0, chunk_size=4, left_chunks=16, dropout=0.1,
                            positional_dropout=0.1, attention_dropout=0.0, ctc_vocab_size=5538),
            "adapter": dict(kind="subsampling", input_dim=1024, output_dim=3584, kernel_size=5,
                            activation="gelu", norm="layer", norm_eps=1e-3, prompt_num=25, num_states=4,
                            task_num=20),
            "decoder": dict(hidden_size=896, num_layers=4, num_heads=14, num_kv_heads=14,
                            intermediate_size=4864, rms_norm_eps=1e-6, rope_theta=10000.0,
                            max_position_embeddings=2048, codec_vocab_size=1024, llm_hidden_size=3584,
                            use_prefix=True, top_k=2, penalty_window=-1, penalty=1.1, max_tokens=1000),
            "codec": dict(sample_rate=24000, upsample_rates=(8, 5, 5, 3),
                          upsample_kernel_sizes=(16, 11, 11, 5), upsample_initial_channel=512,
                          encoder_initial_channel=32, n_codes=1024, code_dim=512,
                          global_codes=8, global_code_size=1024, global_code_dim=16,
                          global_encoder_hidden=64,
                          global_tokens=(473, 975, 419, 219, 565, 121, 550, 616)),
        },
        "seed": 0,
    })


def get_config(variant: str = "freeze_omni") -> ml_collections.ConfigDict:
    cfg = _freeze_omni()
    if variant == "freeze_omni":
        return cfg
    if variant == "qwen2_0_5b":
        cfg.model.llm.update(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                             num_heads=14, num_kv_heads=2, head_dim=64, tie_word_embeddings=True)
        cfg.model.adapter.output_dim = 896
        cfg.model.decoder.llm_hidden_size = 896
        return cfg
    if variant == "tiny":
        cfg.model.llm.update(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=2048,
                             eos_token_ids=(2,), dtype="float32", param_dtype="float32")
        cfg.model.encoder.update(hidden_size=64, num_layers=2, num_heads=4, ffn_size=128, ctc_vocab_size=64)
        cfg.model.adapter.update(input_dim=64, output_dim=64, prompt_num=4)
        cfg.model.decoder.update(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4,
                                 intermediate_size=64, llm_hidden_size=64)
        # codebooks keep 1024 entries so tiny speech-decoder tokens stay valid codec tokens
        cfg.model.codec.update(upsample_initial_channel=64, encoder_initial_channel=8, code_dim=128,
                               resblock_kernel_sizes=(3, 5), global_code_dim=4, global_encoder_hidden=16)
        return cfg
    if variant == "toy":
        # Measured on the full toy world, CTC WER after 1000 steps: 64 x 2 (tiny) 49 %, 64 x 6 43 %,
        # 128 x 4 39 %. Conv2d subsampling as wide as the encoder (the release's) was ~70 % of this
        # encoder's FLOPs; 32 channels make a speech-in 1 step ~3x cheaper (fwd + bwd, 8 x 400
        # frames: 0.59 -> 0.18 s), so speech-in 1 affords 2000 steps (WER 39 -> 33 %) in its time.
        # --quick keeps tiny's encoder (and LLM and decoder) to stay within its 10 minutes.
        cfg = get_config("tiny")
        cfg.model.encoder.update(hidden_size=128, num_layers=4, num_heads=4, ffn_size=512, subsampling_channels=32)
        # LLM 128 wide instead of 64 (full world, the other steps' settings equal; BENCHMARKS.md, toy world): text
        # 96.6 -> 100 %, speech in -> text out 28.8 -> 42.4 / 44.1 % in two runs (arithmetic from
        # speech embeddings mostly; spread ~5 points), state head 86.0 -> 90.7 %, speech out 28.8 ->
        # 37-39 %. The decoder reads each LLM vector as llm/decoder-width frames: 64 wide it read 2
        # per vector and its stage cost 1.5x (404 -> 624 s); 128 x 2 reads 1 and trains 1500 steps
        # in 270-278 s.
        cfg.model.llm.update(hidden_size=128, intermediate_size=384, head_dim=32)
        cfg.model.adapter.update(input_dim=128, output_dim=128)
        cfg.model.decoder.update(hidden_size=128, num_layers=2, intermediate_size=512, llm_hidden_size=128)
        return cfg
    raise ValueError(f"unknown variant {variant!r}; expected freeze_omni, qwen2_0_5b, tiny or toy")
