"""Peer baseline for the CUDA engine: Hugging Face transformers LlamaForCausalLM built from the
same config as pdserve's llama3-8b preset, random bf16 weights, on the same GPU in the same device
command. Measures TTFT at batch 1 per prompt length and the decode step at batch B with a 1k
context, eager (DynamicCache), and the decode step with a static cache + torch.compile for the
batches given by --compiled-batches (compilation costs minutes, so only a few). Writes JSON.

Timing: CUDA synchronise around each call, median of --repeat runs after one warm-up.
"""
import argparse
import json
import statistics
import sys
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM


def cfg():
    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
        torch_dtype="bfloat16")


def timed(fn, repeat):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-lens", default="128,512,1024,2048,4096,8192")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--compiled-batches", default="1,32")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="peer.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    t0 = time.perf_counter()
    with dev:
        model = LlamaForCausalLM._from_config(cfg(), torch_dtype=torch.bfloat16,
                                              attn_implementation="sdpa")
    model.eval()
    print(f"peer: model built in {time.perf_counter() - t0:.1f} s, transformers "
          f"{transformers.__version__}, torch {torch.__version__}", flush=True)
    res = {"peer": "transformers LlamaForCausalLM (sdpa), random bf16 weights",
           "transformers": transformers.__version__, "torch": torch.__version__,
           "device": torch.cuda.get_device_name(), "ttft_eager": [], "decode_eager": [],
           "decode_static_compiled": []}
    V = 128256
    g = torch.Generator(device="cpu").manual_seed(1)

    with torch.inference_mode():
        for n in [int(x) for x in a.prompt_lens.split(",")]:
            ids = torch.randint(0, V, (1, n), generator=g).to(dev)

            def prefill():
                out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
                return out.logits[:, -1].argmax(-1)

            ms = timed(prefill, a.repeat)
            res["ttft_eager"].append({"prompt": n, "ttft_ms": ms})
            print(f"peer eager TTFT {n:6d}: {ms:9.2f} ms", flush=True)

        for B in [int(x) for x in a.batches.split(",")]:
            ids = torch.randint(0, V, (B, a.context), generator=g).to(dev)
            try:
                out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            except torch.OutOfMemoryError:
                print(f"peer eager decode B={B}: out of memory in prefill", flush=True)
                continue
            cache = out.past_key_values
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            ts = []
            for s in range(a.steps + 2):
                torch.cuda.synchronize()
                t = time.perf_counter()
                out = model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
                torch.cuda.synchronize()
                if s >= 2:
                    ts.append((time.perf_counter() - t) * 1e3)
            ms = statistics.median(ts)
            res["decode_eager"].append({"batch": B, "context": a.context, "step_ms": ms})
            print(f"peer eager decode B={B:4d} ctx {a.context}: {ms:8.3f} ms/step", flush=True)
            del cache, out
            torch.cuda.empty_cache()

    # static cache + torch.compile (reduce-overhead: CUDA graphs) for the decode step
    from transformers import StaticCache
    for B in [int(x) for x in a.compiled_batches.split(",") if x]:
        try:
            t0 = time.perf_counter()
            cache = StaticCache(config=model.config, max_batch_size=B,
                                max_cache_len=a.context + a.steps + 8, device=dev,
                                dtype=torch.bfloat16)
        except TypeError:
            cache = StaticCache(config=model.config, max_cache_len=a.context + a.steps + 8)
        try:
            ids = torch.randint(0, V, (B, a.context), generator=g).to(dev)
            with torch.inference_mode():
                pos = torch.arange(a.context, device=dev)
                out = model(input_ids=ids, past_key_values=cache, use_cache=True,
                            cache_position=pos, logits_to_keep=1)
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
            step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
            ts = []
            with torch.inference_mode():
                for s in range(a.steps + 3):
                    cp = torch.tensor([a.context + s], device=dev)
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    out = step(input_ids=tok, past_key_values=cache, use_cache=True,
                               cache_position=cp, logits_to_keep=1)
                    tok = out.logits[:, -1].argmax(-1, keepdim=True).clone()
                    torch.cuda.synchronize()
                    if s >= 3:
                        ts.append((time.perf_counter() - t) * 1e3)
            ms = statistics.median(ts)
            res["decode_static_compiled"].append({"batch": B, "context": a.context, "step_ms": ms,
                                                  "setup_s": time.perf_counter() - t0})
            print(f"peer static+compile decode B={B:4d}: {ms:8.3f} ms/step "
                  f"(setup {time.perf_counter() - t0:.0f} s)", flush=True)
        except Exception as ex:  # report, keep the eager numbers
            print(f"peer static+compile B={B}: failed: {type(ex).__name__}: {ex}"[:600], flush=True)
            res["decode_static_compiled"].append({"batch": B, "error": str(ex)[:300]})
        del cache
        torch.cuda.empty_cache()
    with open(a.out, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
