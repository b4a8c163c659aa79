"""Load an export bundle with onnxruntime-genai and answer one question greedily.

    python bench/genai_check.py runs/quickstart/export/bundle "7 + 3 - 4 + 2 ="

Run it in an environment holding onnxruntime-genai (no torch needed)."""

import json
import sys
import time

import onnxruntime_genai as og

bundle = sys.argv[1]
meta = json.load(open(f"{bundle}/distill_generation.json"))
model = og.Model(bundle)
tok = og.Tokenizer(model)
prompt = meta["prompt_template"].replace(meta["placeholder"], sys.argv[2])
params = og.GeneratorParams(model)
params.set_search_options(max_length=400, do_sample=False)
gen = og.Generator(model, params)
gen.append_tokens(tok.encode(prompt))
out = []
t = time.time()
while not gen.is_done():
    gen.generate_next_token()
    out.append(gen.get_next_tokens()[0])
print(tok.decode(out))
print(f"{len(out)} tokens in {time.time() - t:.2f}s")
