"""The pass pipeline of each mode: plain, named lists, run in order by `manager.run_pipeline`
(which skips, with a remark, a pass that makes an op the target backend has no kernel for)."""

from .base import Pass
from .constants import fold_constants
from .dce import dce
from .fold_bn import fold_bn
from .fuse import fuse_elementwise, fuse_epilogues
from .prologue import fuse_prologues
from .grad_fusion import fuse_bn_grad_sums, fuse_grad_adds, split_bn_grad
from .shortcut import fuse_shortcut
from .train_fusion import fuse_relu_grad, fuse_stats, split_bn

INFER = [
    Pass("dce", dce),                            # drop what no output needs
    Pass("fold_bn", fold_bn),                    # BN into conv weights, else a per-channel affine
    Pass("fuse_shortcut", fuse_shortcut),        # pooled, padded shortcut read by its add
    Pass("fuse_epilogues", fuse_epilogues),      # bias, affine, relu, residual add into convs
    Pass("fuse_elementwise", fuse_elementwise),  # what is left: one kernel per chain
    Pass("fuse_prologues", fuse_prologues),      # an activation into the 1x1 convs reading it
    Pass("fold_constants", fold_constants),      # parameter-only nodes run once, in prepare
]

TRAIN = [
    Pass("dce", dce),                              # drop what no output needs
    Pass("split_bn", split_bn),                    # BN -> batch statistics + normalise
    Pass("fuse_relu_grad", fuse_relu_grad),        # relu backward into the BN gradient kernel
    Pass("fuse_shortcut", fuse_shortcut),          # pooled, padded shortcut read by its add
    Pass("fuse_epilogues", fuse_epilogues),        # residual add into conv3
    Pass("fuse_stats", fuse_stats),                # batch statistics into the producing conv
    Pass("fuse_elementwise", fuse_elementwise),    # normalise + relu, and other chains
    Pass("split_bn_grad", split_bn_grad),          # BN gradient -> its sums + its apply
    Pass("fuse_grad_adds", fuse_grad_adds),        # gradient adds into the kernel making one
    Pass("fuse_bn_grad_sums", fuse_bn_grad_sums),  # BN-gradient sums into the data gradient
    Pass("fuse_prologues", fuse_prologues),        # BN-ReLU into the 1x1 convs reading it
]

PIPELINES = {"infer": INFER, "train": TRAIN}
