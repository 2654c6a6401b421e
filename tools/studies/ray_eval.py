"""One `ecache eval` split over Ray tasks, then merged into what one run would write.

    python3 tools/studies/ray_eval.py --shards 8 --out /shared/study -- \
        --model /models/llava-1.5-7b-hf --dataset /data/mmvet.jsonl \
        --policies full,local,h2o,snapkv,elastic --budgets 0.1,0.2,0.5,0.9

Everything after `--` goes to every shard unchanged. Each task runs the `ecache` binary
(on PATH on every node) on one shard; --out must be on storage every node shares. Ray
retries a task whose node died; a shard that fails for its input stops the run.
"""

import argparse
import subprocess

import ray


@ray.remote(num_cpus=8, max_retries=2)
def shard(index, count, out, args):
    path = f"{out}/shard-{index}.json"
    cmd = ["ecache", "eval", "all", *args, "--shard", f"{index}/{count}", "--output", path]
    subprocess.run(cmd, check=True)
    return path


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("eval_args", nargs=argparse.REMAINDER)
    a = parser.parse_args()
    args = [x for x in a.eval_args if x != "--"]
    ray.init()
    paths = ray.get([shard.remote(i, a.shards, a.out, args) for i in range(1, a.shards + 1)])
    subprocess.run(["ecache", "eval", "merge", *paths, "--output", f"{a.out}/results.json"], check=True)


if __name__ == "__main__":
    main()
