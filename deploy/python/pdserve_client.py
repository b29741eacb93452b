#!/usr/bin/python3
"""pdserve_client: a small example client for a pdserve router (the public pdserve.v1.Pdserve API).

    pdserve_client.py generate --target HOST:PORT --text "Once upon a time" --max-tokens 64
    pdserve_client.py generate --target HOST:PORT --tokens 1,2,3 --json   # one JSON line per message
    pdserve_client.py status --target HOST:PORT
    pdserve_client.py health --target HOST:PORT

Python stubs are generated from proto/pdserve.proto on first use (protoc + grpc_python_plugin, into
--stubs-dir, default ~/.cache/pdserve/python-<hash of the .proto>), so nothing generated is checked
in. Run it with Debian's /usr/bin/python3, which has python3-grpcio and python3-protobuf.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PROTO = os.path.normpath(os.path.join(HERE, "..", "..", "proto", "pdserve.proto"))
GRPC_PLUGIN = "/usr/bin/grpc_python_plugin"


def load_stubs(proto, stubs_dir):
    """Imports pdserve_pb2 / pdserve_pb2_grpc, generating them from `proto` if needed."""
    with open(proto, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    if not stubs_dir:
        cache = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
        stubs_dir = os.path.join(cache, "pdserve", "python-" + digest)
    stamp = os.path.join(stubs_dir, "pdserve.proto.sha256")
    if not (os.path.exists(stamp) and open(stamp).read() == digest):
        os.makedirs(stubs_dir, exist_ok=True)
        cmd = ["protoc", "--proto_path=" + os.path.dirname(proto),
               "--python_out=" + stubs_dir, "--grpc_python_out=" + stubs_dir,
               "--plugin=protoc-gen-grpc_python=" + GRPC_PLUGIN, os.path.basename(proto)]
        try:
            subprocess.run(cmd, check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            sys.exit("pdserve_client: cannot generate stubs (%s): %s" % (" ".join(cmd), e))
        with open(stamp, "w") as f:
            f.write(digest)
    sys.path.insert(0, stubs_dir)
    import pdserve_pb2  # noqa: E402
    import pdserve_pb2_grpc  # noqa: E402
    return pdserve_pb2, pdserve_pb2_grpc


def compact(obj):
    return json.dumps(obj, separators=(",", ":"), sort_keys=True)


def cmd_generate(pb, stub, args):
    req = pb.GenerateRequest(request_id=args.request_id, max_tokens=args.max_tokens,
                             ignore_eos=args.ignore_eos)
    if args.tokens is not None:
        req.token_ids.ids.extend(int(t) for t in args.tokens.split(",") if t)
    else:
        req.text = args.text
    req.sampling.temperature = args.temperature
    req.sampling.top_k = args.top_k
    req.sampling.top_p = args.top_p
    if args.seed is not None:
        req.sampling.seed = args.seed
    if args.stop:
        req.stop_token_ids.extend(int(t) for t in args.stop.split(","))
    if args.ttft_ms or args.tpot_ms or args.slo_class:
        req.slo.ttft_ms = args.ttft_ms
        req.slo.tpot_ms = args.tpot_ms
        req.slo.class_name = args.slo_class
    out = sys.stdout
    for resp in stub.Generate(req, timeout=args.timeout or None):
        kind = resp.WhichOneof("kind")
        if kind == "chunk":
            c = resp.chunk
            if args.json:
                out.write(compact({"type": "chunk", "index": c.index, "ids": list(c.ids),
                                   "text": c.text.decode("utf-8", "replace")}) + "\n")
            else:
                out.buffer.write(c.text)
            out.flush()
        elif kind == "summary":
            s = resp.summary
            fields = {
                "type": "summary", "request_id": s.request_id,
                "finish_reason": pb.FinishReason.Name(s.finish_reason),
                "prompt_tokens": s.prompt_tokens, "output_tokens": s.output_tokens,
                "ttft_ms": round(s.ttft_ms, 3), "tpot_mean_ms": round(s.tpot_mean_ms, 3),
                "tpot_p90_ms": round(s.tpot_p90_ms, 3), "queue_ms": round(s.queue_ms, 3),
                "kv_transfer_bytes": s.kv_transfer_bytes,
                "kv_transfer_ms": round(s.kv_transfer_ms, 3),
                "prefill_node": s.prefill_node, "decode_node": s.decode_node, "seed": s.seed,
                "replacements": s.replacements,
            }
            if args.json:
                out.write(compact(fields) + "\n")
            else:
                out.write("\n")
                sys.stderr.write(" ".join("%s=%s" % (k, v) for k, v in fields.items()
                                          if k != "type") + "\n")
    return 0


def cmd_status(pb, stub, args):
    st = stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=args.timeout or None)
    if args.json:
        rows = [{"node_id": n.node_id, "address": n.address, "role": pb.NodeRole.Name(n.role),
                 "state": pb.NodeState.Name(n.state),
                 "queued_prompt_tokens": n.queued_prompt_tokens, "running_seqs": n.running_seqs,
                 "context_tokens": n.context_tokens, "free_kv_blocks": n.free_kv_blocks,
                 "total_kv_blocks": n.total_kv_blocks,
                 "last_report_age_ms": n.last_report_age_ms} for n in st.nodes]
        print(compact({"router_id": st.router_id, "queued_requests": st.queued_requests,
                       "active_requests": st.active_requests, "nodes": rows}))
        return 0
    print("router %s: %d queued, %d active" % (st.router_id, st.queued_requests,
                                                 st.active_requests))
    fmt = "%-14s %-21s %-10s %-9s %9s %7s %9s %13s %7s"
    print(fmt % ("NODE", "ADDRESS", "ROLE", "STATE", "QUEUED_TK", "RUNNING", "CONTEXT",
                 "KV_FREE/TOTAL", "AGE_MS"))
    for n in st.nodes:
        print(fmt % (n.node_id, n.address, pb.NodeRole.Name(n.role)[len("NODE_ROLE_"):],
                     pb.NodeState.Name(n.state)[len("NODE_STATE_"):], n.queued_prompt_tokens,
                     n.running_seqs, n.context_tokens,
                     "%d/%d" % (n.free_kv_blocks, n.total_kv_blocks), n.last_report_age_ms))
    return 0


def cmd_health(pb, stub, args):
    h = stub.Health(pb.HealthRequest(), timeout=args.timeout or None)
    print("%s %s role=%s protocol=%d build=%r uptime_ms=%d" % (
        h.node_id, pb.NodeState.Name(h.state), pb.NodeRole.Name(h.role), h.protocol_version,
        h.build, h.uptime_ms))
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--proto", default=DEFAULT_PROTO, help="path of pdserve.proto")
    ap.add_argument("--stubs-dir", default=None, help="where generated stubs go")
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p):
        p.add_argument("--target", default="127.0.0.1:7000", help="router host:port")
        p.add_argument("--timeout", type=float, default=0, help="seconds; 0 = none")
        p.add_argument("--json", action="store_true", help="one JSON object per line")

    g = sub.add_parser("generate", help="stream tokens for one prompt")
    common(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--text")
    src.add_argument("--tokens", help="comma-separated prompt token ids")
    g.add_argument("--request-id", default="")
    g.add_argument("--max-tokens", type=int, default=0)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", help="comma-separated stop token ids")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--ttft-ms", type=float, default=0.0)
    g.add_argument("--tpot-ms", type=float, default=0.0)
    g.add_argument("--slo-class", default="")
    common(sub.add_parser("status", help="show the cluster's nodes"))
    common(sub.add_parser("health", help="ask one node whether it is up"))
    args = ap.parse_args(argv)

    pb, pb_grpc = load_stubs(args.proto, args.stubs_dir)
    import grpc  # after stubs: a missing grpc module is reported by the import itself
    with grpc.insecure_channel(args.target) as channel:
        stub = pb_grpc.PdserveStub(channel)
        try:
            return {"generate": cmd_generate, "status": cmd_status,
                    "health": cmd_health}[args.cmd](pb, stub, args)
        except grpc.RpcError as e:
            sys.stderr.write("pdserve_client: %s: %s\n" % (e.code().name, e.details()))
            return 2


if __name__ == "__main__":
    sys.exit(main())
