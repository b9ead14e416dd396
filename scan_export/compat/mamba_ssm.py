"""`import scan_export.compat.mamba_ssm`: the one import line that makes upstream's `mamba_ssm`,
`causal_conv1d` and `selective_scan_cuda` imports resolve to our drop-ins (scan_export.compat.install())."""

from . import install

PROVIDED = install()
