#!/usr/bin/env python3
"""slo_calibrate.py: the in-cluster terms of the SLO latency model from `run_slo_cpu.sh calibrate`.

Inputs: the profile (isolated-engine coefficients) and the per-request CSVs of the calibration runs
(none of them is a request the evaluation sends). Terms, each measured directly:
  ttft_overhead_ms        median over isolated requests of TTFT - the prefill node's own batch time
                          and exposed transfer for that prompt (its `handoff` log line; without the
                          log, the profile's prefill(prompt) and the model's exposed transfer):
                          router hop, Prefill RPC, OpenTransfer, kvx commit, CommitTransfer, the
                          first token's way back — the control path the compute model lacks. Taken
                          against the node's measured batch, a drift of the engine's speed since
                          the profile does not land in this term.
  decode_step_overhead_ms median over isolated requests of TPOT - step(1, mean context) x the
                          decode node's own one-sequence steps over the profile (its trace)
                          (token streaming decode -> router -> client, the decode loop's own work)
  decode_contention       the decode node's one-sequence steps that ran wholly beside a prefill
                          batch against those that ran beside none (both nodes' debug traces,
                          timestamped: decode `step`, prefill `batch` lines; each step's forward time
                          over the profile's step at its context), minus 1 (two engines and their
                          I/O threads on the same cores); without the trace, the TPOT of one long
                          decode while the prefill node computes back to back over its TPOT
                          alone. The simulator runs the part of a decode step that overlaps a
                          prefill batch at 1 / (1 + this) of its speed.
  prefill_contention      the mirror image, a prefill slowed by decoding: one-prompt prefill
                          batches with decode steps running through them against those beside
                          none (both traces), each over the profile's prefill; with fewer than 8
                          beside decoding, the 384-token prompts' median TTFT beside a decoding
                          batch against the isolated ones. Both sides come from the same run, so a
                          drift of the machine's speed since the profile cancels out.
A check, not a term: B = 1, 4, 8 long decodes at once; their token gap against the profile's step at
that batch (does the in-cluster step grow faster with the batch than the profile's?).
"""
import argparse, csv, datetime, json, statistics, sys

ap = argparse.ArgumentParser()
ap.add_argument("--profile", required=True)
ap.add_argument("--dir", required=True)
ap.add_argument("--loadavg", default="")
ap.add_argument("--out", required=True)
ap.add_argument("--link-gbps", type=float, default=20.0)
a = ap.parse_args()
p = json.load(open(a.profile))
pf, dc, kv = p["prefill"], p["decode"], p["kv"]


def prefill_ms(t):
    return max(0.0, pf["a_ms"] + pf["b_ms_per_token"] * t + pf["c_ms_per_token2"] * t * t)


def step_ms(b, c):  # pds_slo_decode_step_ms (common/slo/slo_model.c), knots included
    knots = dc.get("knots", [])
    if len(knots) >= 2:
        i = 0
        while i + 2 < len(knots) and b > knots[i + 1]["batch"]:
            i += 1
        lo, hi = knots[i], knots[i + 1]
        at = [k["base_ms"] + k["ms_per_context_token"] * c for k in (lo, hi)]
        return max(0.0, at[0] + (at[1] - at[0]) * (b - lo["batch"]) / (hi["batch"] - lo["batch"]))
    if dc.get("split_batch", 0) and b > dc["split_batch"]:
        v = dc["d2_ms"] + dc["e2_ms_per_seq"] * b + dc["f2_ms_per_context_token"] * c
    else:
        v = dc["d_ms"] + dc["e_ms_per_seq"] * b + dc["f_ms_per_context_token"] * c
    return max(0.0, v)


def exposed_ms(tokens, compute):  # same formula as pds_slo_transfer_exposed_ms, no msg cost
    L = kv["n_layers"] or 1
    t = tokens * kv["bytes_per_token"] / L / (a.link_gbps / 8 * 1e9) * 1e3
    return t + (L - 1) * max(0.0, t - compute / L)


def rows(name):
    return [r for r in csv.DictReader(open(f"{a.dir}/{name}.csv")) if r["status"].lower() == "ok"]


# the prefill node's handoff lines, in order: (tokens, batch ms, exposed ms)
handoffs = []
try:
    for line in open(f"{a.dir}/calib/p0.log"):
        if "msg=handoff " not in line:
            continue
        fld = dict(w.split("=", 1) for w in line.split() if "=" in w)
        handoffs.append((int(fld["tokens"]), float(fld["prefill_ms"]), float(fld["exposed_ms"])))
except (FileNotFoundError, KeyError, ValueError):
    handoffs = []

iso = []
for name in ("iso-64", "iso-192", "iso-384"):
    rs = rows(name)
    # the isolated runs come first and one at a time: the first len(rs) handoffs of this length
    # are theirs (later runs reuse 384 tokens)
    own = [h for h in handoffs if h[0] == int(name.split("-")[1])][:len(rs)]
    for i, r in enumerate(rs):
        n, o = int(r["prompt_tokens"]), int(r["output_tokens"])
        ttft, tpot = float(r["ttft_ms"]), float(r["tpot_ms"])
        comp = prefill_ms(n)
        x = {"prompt": n, "output": o, "ttft_ms": ttft, "tpot_ms": tpot,
             "prefill_model_ms": comp, "exposed_ms": exposed_ms(n, comp),
             "ttft_extra_ms": ttft - comp - exposed_ms(n, comp),
             "step_model_ms": step_ms(1, n + o / 2),
             "tpot_extra_ms": tpot - step_ms(1, n + o / 2)}
        if len(own) == len(rs):
            x["prefill_node_ms"], x["prefill_node_exposed_ms"] = own[i][1], own[i][2]
            x["ttft_control_ms"] = ttft - own[i][1] - own[i][2]
        iso.append(x)
if not iso:
    sys.exit("slo_calibrate.py: no successful isolated requests")
measured = all("ttft_control_ms" in x for x in iso)
ttft_over = statistics.median(x["ttft_control_ms" if measured else "ttft_extra_ms"] for x in iso)
# a check, not a term: the prefill node's batch time against the profile's (engine drift)
speed = (statistics.median(x["prefill_node_ms"] / x["prefill_model_ms"] for x in iso)
         if measured else None)
if measured:
    print(f"control path from the prefill node's own batch times: median {ttft_over:.2f} ms "
          f"(against the profile's prefill: {statistics.median(x['ttft_extra_ms'] for x in iso):.2f} ms); "
          f"node batch / profile prefill: median {speed:.3f}")
step_over = max(0.0, statistics.median(x["tpot_extra_ms"] for x in iso))  # noise can dip below 0
alone, busy = rows("long-alone"), rows("long-busy")
tpot_alone, tpot_busy = float(alone[0]["tpot_ms"]), float(busy[0]["tpot_ms"])
contention_tpot = max(0.0, tpot_busy / tpot_alone - 1)
contention = contention_tpot


def log_ts(line):  # the log line's ts= field (UTC wall clock, ms) in seconds
    t = line.split("ts=", 1)[1].split()[0].rstrip("Z")
    return datetime.datetime.fromisoformat(t).replace(tzinfo=datetime.timezone.utc).timestamp()


def trace(node, msg, ms_key, ago_key=None):
    """A node's debug trace lines of one kind (calib/NODE.log): [(fields, start s, end s, ms)],
    the interval ending at the line's timestamp (less ago_key ms) and lasting ms = ms_key."""
    out = []
    for line in open(f"{a.dir}/calib/{node}.log"):
        if f"msg={msg} " in line:
            fld = dict(w.split("=", 1) for w in line.split() if "=" in w)
            t1 = log_ts(line) - (float(fld[ago_key]) / 1e3 if ago_key else 0.0)
            ms = float(fld[ms_key])
            out.append((fld, t1 - ms / 1e3, t1, ms))
    return out


def beside_vs_alone(own, other, model, full_frac, min_n):
    """One-sequence entries of `own` (forward time over `model`) that `other`'s intervals cover
    by >= full_frac, against those they do not touch: their medians and the ratio minus 1, or
    None with fewer than min_n on a side."""
    beside, alone_ = [], []
    for fld, t0, t1, ms in own:
        if int(fld["seqs"]) != 1:
            continue
        ov = sum(max(0.0, min(t1, e) - max(t0, b)) for _, b, e, _ in other if b < t1 and e > t0)
        r = ms / max(1e-6, model(fld))
        if ov >= full_frac * ms / 1e3:
            beside.append(r)
        elif ov == 0.0:
            alone_.append(r)
    if len(beside) < min_n or len(alone_) < min_n:
        return None
    mb, ma = statistics.median(beside), statistics.median(alone_)
    return {"beside": len(beside), "alone": len(alone_), "median_over_profile_beside": mb,
            "median_over_profile_alone": ma, "contention": max(0.0, mb / ma - 1)}


# The same term from the nodes' traces (their logs at debug level): every one-sequence decode
# step's forward time against the profile's step for its context, the steps that ran entirely
# beside a prefill batch (the prefill node's `batch` lines) against those that ran beside none.
# Hundreds of steps instead of two TPOTs, and no token-streaming time in the ratio.
# Prefill contention the same way, from the prefill node's one-prompt batches (forward time over
# the profile's prefill for its tokens) that ran with decode steps covering >= 80% of them against
# those that ran beside no decode step; the term when at least 8 ran beside decoding (the eight
# prompts of (C) and the background prompts of (B)), else the 384-token prompts' median below.
step_trace = batch_trace = None
try:
    steps = trace("d0", "step", "forward_ms")
    batches = trace("p0", "batch", "ms", "ended_ms_ago")
    st = beside_vs_alone(steps, batches, lambda f: step_ms(1, int(f["context"])), 0.95, 20)
    if st:
        step_trace = {"steps_beside_prefill": st["beside"], "steps_alone": st["alone"],
                      "median_over_profile_beside": st["median_over_profile_beside"],
                      "median_over_profile_alone": st["median_over_profile_alone"],
                      "contention": st["contention"]}
        contention = st["contention"]
    bt = beside_vs_alone(batches, steps, lambda f: prefill_ms(int(f["tokens"])), 0.8, 5)
    if bt:
        batch_trace = {"batches_beside_decode": bt["beside"], "batches_alone": bt["alone"],
                       "median_over_profile_beside": bt["median_over_profile_beside"],
                       "median_over_profile_alone": bt["median_over_profile_alone"],
                       "contention": bt["contention"]}
except (FileNotFoundError, KeyError, ValueError, IndexError):
    step_trace = batch_trace = None
# The per-step overhead against the engine's speed during this calibration rather than the
# profile's: each isolated request's TPOT minus the profile's step times the decode node's own
# one-sequence steps over the profile (those beside no prefill batch). Otherwise whatever the
# machine's speed did between the profile and this run lands in the overhead, and `evaluate`
# adds it on top of profiles that bracket each run and so already carry the drift.
step_over_profile = step_over
if step_trace:
    speed_dec = step_trace["median_over_profile_alone"]
    step_over = max(0.0, statistics.median(x["tpot_ms"] - speed_dec * x["step_model_ms"]
                                           for x in iso))
pre = rows("pre-busy")
comp384 = prefill_ms(384)
ttft_pre = statistics.median(float(r["ttft_ms"]) for r in pre)
iso384 = statistics.median(x["ttft_ms"] for x in iso if x["prompt"] == 384)
comp384_iso = iso384 - ttft_over - exposed_ms(384, comp384)
pcont = max(0.0, (ttft_pre - iso384) / comp384_iso) if comp384_iso > 0 else 0.0
h384 = [h[1] for h in handoffs if h[0] == 384]
n_iso384 = sum(1 for x in iso if x["prompt"] == 384)
if measured and len(h384) >= n_iso384 + len(pre):
    # the node's own batch times: the 384-token prompts beside the decoding batch (the handoffs
    # after the isolated ones) against the isolated ones
    pcont = max(0.0, statistics.median(h384[n_iso384:n_iso384 + len(pre)]) /
                statistics.median(h384[:n_iso384]) - 1)
pcont_prompts = pcont
if batch_trace and batch_trace["batches_beside_decode"] >= 8:
    pcont = batch_trace["contention"]  # the traces' many batches, as for decode contention
by_len = {}
for x in iso:
    by_len.setdefault(x["prompt"], []).append(x)
print("prompt | n | TTFT meas (median) | prefill model | TTFT extra | TPOT meas | step model | TPOT extra")
for n in sorted(by_len):
    xs = by_len[n]
    med = lambda k: statistics.median(x[k] for x in xs)
    print(f"{n} | {len(xs)} | {med('ttft_ms'):.1f} | {med('prefill_model_ms'):.1f} | "
          f"{med('ttft_extra_ms'):.1f} | {med('tpot_ms'):.2f} | {med('step_model_ms'):.2f} | "
          f"{med('tpot_extra_ms'):.2f}")
print(f"long decode (32 + 400): TPOT alone {tpot_alone:.2f} ms, beside busy prefill "
      f"{tpot_busy:.2f} ms -> contention {contention_tpot:.3f}")
if step_trace:
    print(f"decode step trace: {step_trace['steps_beside_prefill']} one-sequence steps wholly beside "
          f"a prefill batch, {step_trace['steps_alone']} beside none; forward / profile step "
          f"{step_trace['median_over_profile_beside']:.3f} vs {step_trace['median_over_profile_alone']:.3f} "
          f"-> contention {contention:.3f} (the term); per-step overhead against the node's own "
          f"steps {step_over:.3f} ms (the term; against the profile's {step_over_profile:.3f})")
print(f"384-token prompts: TTFT isolated {iso384:.1f} ms, beside a decoding batch {ttft_pre:.1f} ms "
      f"-> prefill contention {pcont_prompts:.3f}")
if batch_trace:
    print(f"prefill batch trace ({'the term' if pcont != pcont_prompts else 'a check: < 8 beside'}): {batch_trace['batches_beside_decode']} one-prompt batches "
          f"beside decode steps, {batch_trace['batches_alone']} beside none; forward / profile "
          f"{batch_trace['median_over_profile_beside']:.3f} vs {batch_trace['median_over_profile_alone']:.3f} "
          f"-> {batch_trace['contention']:.3f}")
# (D) a check, not a term: the in-cluster token gap at batch B vs the profile's step
batch_check = []
for b in (1, 4, 8):
    try:
        rs = rows(f"batch-{b}")
    except FileNotFoundError:
        continue
    gaps = sorted(float(r["tpot_ms"]) for r in rs)
    n0, o0 = int(rs[0]["prompt_tokens"]), int(rs[0]["output_tokens"])
    model = step_ms(b, b * (n0 + o0 / 2))
    batch_check.append({"batch": b, "tpot_median_ms": statistics.median(gaps), "profile_step_ms": model})
    print(f"{b} decodes at once: token gap median {statistics.median(gaps):.2f} ms, profile step "
          f"{model:.2f} ms ({100 * (statistics.median(gaps) / model - 1):+.0f}%)")
section = {"ttft_overhead_ms": round(ttft_over, 2), "decode_step_overhead_ms": round(step_over, 3),
           "decode_contention": round(contention, 3),
           "prefill_contention": round(pcont, 3)}
print("cluster section:", json.dumps(section))
json.dump({"bench": "slo-cluster-calibration", "profile": a.profile, "loadavg_after": a.loadavg,
           "cluster": section, "isolated": iso, "control_from_node_log": measured,
           "node_batch_over_profile": speed,
           "decode_step_trace": step_trace, "decode_contention_from_tpot": contention_tpot,
           "decode_step_overhead_vs_profile_ms": step_over_profile,
           "prefill_batch_trace": batch_trace, "prefill_contention_from_prompts": pcont_prompts,
           "long_decode": {"tpot_alone_ms": tpot_alone, "tpot_beside_prefill_ms": tpot_busy,
                           "alone": alone[0], "busy": busy[0]},
           "background": rows("bg"), "batch_check": batch_check,
           "prefill_beside_decode": {"ttft_median_ms": ttft_pre, "isolated_median_ms": iso384,
                                     "requests": pre, "decode_batch": [json.load(open(f"{a.dir}/dec-bg-{k}.json")) for k in (1, 2)]}}, open(a.out, "w"), indent=2)
