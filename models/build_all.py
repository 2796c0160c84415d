"""Regenerate every fixture in models/: `python models/build_all.py`.

Builders run one after another in this process; each reseeds torch itself, so the
result is the same as running the scripts one by one.
"""

from __future__ import annotations

import mlp_digits
import resnet_digits
import transformer_digits


def main() -> None:
    """Build the MLP, ResNet (both variants) and transformer fixtures."""
    for builder in (mlp_digits, resnet_digits, transformer_digits):
        builder.main()


if __name__ == "__main__":
    main()
