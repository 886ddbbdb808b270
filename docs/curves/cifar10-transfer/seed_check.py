"""Do seeds 0 and 1 of el2n/hardest@50% (pretrained proxies) train different models? The study's own code, from the
repository root with the study's cached proxy scores: python docs/curves/cifar10-transfer/seed_check.py"""

import time
from pathlib import Path

import numpy as np
import torch
import yaml

from datadiet.curve import CurveArguments, _subset
from datadiet.curve.training import CurveData, accuracy_on, build_curve_model, proxy_scores, stream_seed, train_on_rows

torch.set_num_threads(1)
cfg = yaml.safe_load(open("recipes/transfer/curve_pretrained_proxies.yaml"))
args = CurveArguments(**cfg)
data = CurveData(args)
scores = proxy_scores(args, data, Path(args.output_dir))
labels = data.y_train.numpy()
out = {}
for seed in (0, 1):
    rows = _subset(args, scores, labels, ("el2n", "hardest", 0.5, seed))
    ts = stream_seed("training", seed)
    model = build_curve_model(args, data, ts)
    head0 = model.get_classifier().weight.detach().clone()
    t = time.time()
    model = train_on_rows(model, data, rows, args.max_steps, args, ts)
    with torch.no_grad():
        logits = torch.cat(
            [model(data.normalise(data.x_validation[i : i + 256])) for i in range(0, len(data.y_validation), 256)]
        )
    pred = logits.argmax(-1)
    print(
        seed,
        "study accuracy_on",
        accuracy_on(model, data, data.x_validation, data.y_validation, args.eval_batch_size),
        flush=True,
    )
    out[seed] = dict(
        rows=rows, head0=head0, pred=pred, logits=logits, acc=(pred == data.y_validation).float().mean().item()
    )
    print(seed, "rows", len(rows), "acc (no flip TTA)", out[seed]["acc"], "s", round(time.time() - t), flush=True)
print("same rows:", np.array_equal(out[0]["rows"], out[1]["rows"]))
print("same initial head:", torch.equal(out[0]["head0"], out[1]["head0"]))
print(
    "predictions differ on",
    int((out[0]["pred"] != out[1]["pred"]).sum()),
    "of",
    len(out[0]["pred"]),
    "validation rows",
)
print("max |logit diff|", float((out[0]["logits"] - out[1]["logits"]).abs().max()))
