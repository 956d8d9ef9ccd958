"""The device half of the GPU data path: uint8 image batches -> normalised views on the training device.

:func:`components.data.views.make_views` is already batched tensor work with per-sample
parameters (each sample its own crop box, flip, colour matrix, blur sigma), so on a GPU one
batch of 256 x two 224-px views costs about a millisecond. The parameters are drawn on the host
from one ``torch.Generator``: a seed gives the same views on a GPU as on the CPU (to rounding;
``tests/unit/test_perf_options.py``), and nothing waits for the device while they are drawn.

:meth:`DeviceViews.iterate` overlaps the data work with training: the copy of batch i+1 (from
pinned memory) and its views run on a side CUDA stream while the step runs batch i on the
default stream. On the CPU it is a plain loop.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from components.data.views import IMAGENET_MEAN, IMAGENET_STD, ViewRecipe, make_views


class DeviceViews:
    """Make a recipe's views of uint8 batches on ``device``; returns ``{"view_i": normalised float}``.

    ``seed`` seeds the view generator (one stream of parameters across batches);
    ``channels_last`` lays the views out NHWC for a channels-last model.
    """

    def __init__(self, recipe: ViewRecipe, device: torch.device | str = "cpu", seed: int = 0, channels_last: bool = False, side_stream: bool = True):
        self.recipe = recipe
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.generator = torch.Generator().manual_seed(seed)
        self.channels_last = channels_last
        self.stream = torch.cuda.Stream(self.device) if side_stream and self.device.type == "cuda" else None
        # Made once: building them per batch (torch.tensor(..., device=cuda)) would be a blocking copy.
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1) * 255.0

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of one batch, uint8 ``(N, H, W, 3)`` or ``(N, 3, H, W)`` on any device, made on ``self.device``."""
        x = images.to(self.device, non_blocking=True)
        out = {}
        for key, v in make_views(x, self.recipe, self.generator).items():
            v = (v.float() - self._mean) / self._std  # = views.normalize, with the constants kept on the device
            out[key] = v.contiguous(memory_format=torch.channels_last) if self.channels_last else v
        return out

    def iterate(self, batches: Iterable[torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
        """Views of every batch in order, the next batch's issued on a side stream one step ahead."""
        if self.stream is None:
            for b in batches:
                yield self(b)
            return
        main = torch.cuda.current_stream(self.device)
        it = iter(batches)

        def issue():
            b = next(it, None)
            if b is None:
                return None
            if b.device == self.device:  # made on the device by the main stream (e.g. decoded by nvJPEG)
                self.stream.wait_stream(main)
                b.record_stream(self.stream)
            with torch.cuda.stream(self.stream):
                views = self(b)
                done = torch.cuda.Event()
                done.record(self.stream)
            return views, done

        ahead = issue()
        while ahead is not None:
            views, done = ahead
            main.wait_event(done)
            for t in views.values():
                t.record_stream(main)  # made on the side stream, freed after the main stream's use
            ahead = issue()
            yield views
