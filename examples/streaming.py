"""Streaming: print each request's new text as it is generated; abort one midway.

    python examples/streaming.py
    launch/mpirun.sh -n 2 python examples/streaming.py --abort-after 8

Two requests run together. Every delta (the tokens and text one step added to a
request) is printed as it comes, on its own line: `[req-0] ' unto'` (the built-in
model's tokens are bytes, so mostly one character a line). Once the second
request has produced --abort-after tokens it is aborted: it ends at once with
finish_reason "abort", keeping the tokens it has; the first runs to --max-tokens.
"""

from __future__ import annotations

import argparse

from ppruntime import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint directory (default: the built-in model)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--abort-after", type=int, default=8, help="tokens before the abort")
    args = parser.parse_args()

    with LLM(model=args.model) as llm:  # from here on: rank 0 only
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
        kept = llm.add_request("And God said", params, stream=True)
        aborted = llm.add_request("In the beginning", params, stream=True)
        text = {kept: "", aborted: ""}
        tokens = {kept: 0, aborted: 0}
        finish_reason: dict[str, str] = {}
        abort_sent = False
        while len(finish_reason) < 2:
            _, deltas = llm.step()  # one iteration; deltas of every streaming request
            for delta in deltas:
                text[delta.request_id] += delta.text
                tokens[delta.request_id] += len(delta.token_ids)
                if delta.text:
                    print(f"[{delta.request_id}] {delta.text!r}", flush=True)
                if delta.finished:
                    finish_reason[delta.request_id] = delta.finish_reason
                    print(f"[{delta.request_id}] finished: {delta.finish_reason}", flush=True)
            if not abort_sent and tokens[aborted] >= args.abort_after:
                llm.abort(aborted)  # ends with finish_reason="abort" and its tokens so far
                abort_sent = True
        for request_id in (kept, aborted):
            reason, count = finish_reason[request_id], tokens[request_id]
            print(f"{request_id}: {reason} after {count} tokens: {text[request_id]!r}")


if __name__ == "__main__":
    main()
