"""What the host (torch) and the device (numpy + onnxruntime, no torch) both import: the data
contract between them.

    datasets.py          Dataset, the loaders (.npz, MNIST IDX, CIFAR-10 batches, digits, MNIST-1D),
                         the stratified split and the global standardizer
    mnist1d.py           the mnist1d package's generator, behind one function
    preference_pairs.py  preference pairs: synthetic, or JSONL text through a byte tokenizer
    shift.py             the simulated sensor shift (misaligned, rotated, dimmer, noisier)
    batches.py           which samples make up training step k: the batch order the host trainer,
                         the device runtime, the link client and the fixed-point simulator share

Everything here is numpy and the standard library. A host extra (sklearn's digits, the mnist1d
package) is imported inside the one function that needs it, so the device imports every module
here without it. tests/test_no_torch.py imports them all with torch blocked.
"""
