"""``qmpass compress`` on graphs written by torch's dynamo exporter (the default since
torch 2.9), not only the TorchScript exporter the committed fixtures come from.

For each fixture architecture (``models/``), a model is trained on the digits here (15
epochs, the fixture's optimiser settings) and exported with
``torch.onnx.export(dynamo=True)``, with ``optimize`` on and off (IR capped at 10 for
onnxruntime). Each graph is compressed at ``--keep 0.5`` with and without calibration
(64 training samples) at the default tolerance; the table gives what was kept, the
verified error, and the held-out accuracy before and after.

Needs the ``models`` extra (torch, scikit-learn, onnxscript):
``pip install -e ".[models]" && python bench/real_exporters.py``.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "models"):  # the builders import their helpers as scripts do
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import _common  # noqa: E402  (as the builders import it)
import mlp_digits  # noqa: E402
import resnet_digits  # noqa: E402
import torch  # noqa: E402
import transformer_digits  # noqa: E402

from qmpass import CompressConfig, compress  # noqa: E402
from qmpass.verify import accuracy  # noqa: E402

ARCHITECTURES = (
    ("resnet_digits", resnet_digits.make_model, resnet_digits.LAYOUT, resnet_digits.CONFIG),
    ("transformer_digits", transformer_digits.DigitTransformer, transformer_digits.LAYOUT,
     transformer_digits.CONFIG),
    ("mlp_digits", mlp_digits.make_model, mlp_digits.LAYOUT, mlp_digits.CONFIG),
)


def export(net: torch.nn.Module, example: torch.Tensor, optimize: bool) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            net, (example,), dynamo=True, optimize=optimize, verbose=False,
            input_names=[_common.INPUT_NAME], output_names=[_common.OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
    model = program.model_proto
    model.ir_version = min(model.ir_version, 10)
    return model


def main() -> int:
    start = time.perf_counter()
    print("| model | optimize | calibration | IR / opset | parameters | kept | relative error "
          "| held-out accuracy | rewrites kept | operators declined |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, make, layout, config in ARCHITECTURES:
        _common.seed_everything()
        split = _common.load_split(layout)
        net = make()
        _common.train(net, split, _common.TrainConfig(epochs=min(config.epochs, 15),
                                                      lr=config.lr,
                                                      weight_decay=config.weight_decay))
        feeds = {_common.INPUT_NAME: split.x_test}
        calib = {_common.INPUT_NAME: split.x_train[: _common.CALIB_SIZE]}
        for optimize in (True, False):
            model = export(net, torch.from_numpy(split.x_test[:2]), optimize)
            before = accuracy(model, feeds, split.y_test)
            for feed in (calib, None):
                out, report = compress(model, CompressConfig(keep=0.5, calib=feed))
                onnx.checker.check_model(out, full_check=True)
                doc = report.to_dict()
                kinds = sorted({o.step.kind for o in report.kept})
                print(f"| {name} | {optimize} | {'yes' if feed else 'no'} | "
                      f"{model.ir_version} / {model.opset_import[0].version} | "
                      f"{doc['params_before']:,} -> {doc['params_after']:,} | "
                      f"{doc['keep_achieved']:.3f} | "
                      f"{doc['verification']['relative_error']:.4f} | "
                      f"{before:.4f} -> {accuracy(out, feeds, split.y_test):.4f} | "
                      f"{', '.join(kinds) or '-'} | {len(doc['declined_operators'])} |")
    print(f"\n(whole run: {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
