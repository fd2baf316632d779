"""Talk to `m2r2-moe serve` with the openai client package (pip install "m2r2_moe[serve]").

    m2r2-moe serve &                                        # the built-in model on http://127.0.0.1:8000
    python examples/openai_client.py --prompt "def fibonacci(n):"

Streams a greedy completion token by token, then asks for one without streaming, and prints the server's
statistics (GET /stats: hits, misses and stalls of the offloaded model, requests served and refused).
"""

import argparse
import json
import urllib.request

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="where m2r2-moe serve listens")
    parser.add_argument("--prompt", default="def fibonacci(n):\n    ")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()

    client = OpenAI(base_url=f"{args.url}/v1", api_key="unused")  # the server asks for no key
    model = client.models.list().data[0].id
    print(f"model: {model}\n\n{args.prompt}", end="", flush=True)
    stream = client.completions.create(model=model, prompt=args.prompt, max_tokens=args.max_tokens, temperature=0,
                                       stream=True)
    for chunk in stream:
        print(chunk.choices[0].text, end="", flush=True)

    whole = client.completions.create(model=model, prompt=args.prompt, max_tokens=args.max_tokens, temperature=0)
    print(f"\n\nthe same without streaming ({whole.usage.completion_tokens} tokens, finish_reason "
          f"{whole.choices[0].finish_reason!r})")

    with urllib.request.urlopen(f"{args.url}/stats") as response:  # not part of the OpenAI API
        stats = json.load(response)
    runtime = stats["runtime"]
    print(f"server: {json.dumps(stats['server'])}\nruntime: {runtime['hit_rate']:.1%} hit rate, "
          f"{runtime['misses']} misses, {runtime['stall_seconds'] * 1e3:.1f} ms stalled\nmemory: {stats['memory_plan']}")


if __name__ == "__main__":
    main()
