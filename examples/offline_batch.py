"""Offline batch generation: a prompts file in, a JSON-lines file out.

    launch/mpirun.sh -n 2 python examples/offline_batch.py examples/prompts.jsonl outputs.jsonl
    launch/mpirun.sh -n 4 python examples/offline_batch.py prompts.jsonl out.jsonl --model /ckpt

Each line of the prompts file is {"prompt": "text"} or {"prompt_token_ids": [1, 2, 3]}
(blank lines are skipped). Each line of the output file is one JSON object per prompt,
in input order: "index" (the prompt's line among the non-blank ones), "request_id",
"prompt_token_ids", "token_ids", "text", "finish_reason".

Every rank runs this script. `LLM(...)` loads each rank's own pipeline stage; on
ranks other than 0 it serves the pipeline and ends the process when rank 0 is done,
so everything after it runs on rank 0 only.
"""

from __future__ import annotations

import argparse
import json

from ppruntime import LLM, SamplingParams


def read_prompts(path: str) -> list[str | list[int]]:
    prompts = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if "prompt" in record:
                prompts.append(record["prompt"])
            elif "prompt_token_ids" in record:
                prompts.append(record["prompt_token_ids"])
            else:
                raise ValueError(f"{path}:{number}: needs 'prompt' or 'prompt_token_ids'")
    return prompts


def main() -> None:
    parser = argparse.ArgumentParser(description="prompts file in, JSON-lines file out")
    parser.add_argument("prompts_file")
    parser.add_argument("output_file")
    parser.add_argument("--model", help="checkpoint directory (default: the built-in model)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    args = parser.parse_args()

    with LLM(model=args.model) as llm:  # from here on: rank 0 only
        prompts = read_prompts(args.prompts_file)
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
        outputs = llm.generate(prompts, params, use_tqdm=False)  # in input order
        with open(args.output_file, "w", encoding="utf-8") as out:
            for index, output in enumerate(outputs):
                out.write(json.dumps({"index": index, **output.to_json()}) + "\n")
    print(f"wrote {len(outputs)} outputs to {args.output_file}")


if __name__ == "__main__":
    main()
