"""Training and evaluation batches.

BatchStream makes training batch k of a run a pure function of (seed, k): the epoch's
shuffle comes from SeedSequence([seed, SHUFFLE, epoch]) and the batch's augmentation
from SeedSequence([seed, AUGMENT, k]). Resuming at start_step=k therefore replays the
uninterrupted run bit for bit, with no generator state to save beyond the step. The
stream tags keep the two kinds of draw from ever sharing a seed.

In a data-parallel job, rank r of K takes images [r B/K, (r+1) B/K) of every global batch of
B, augmented with the draws they get in the whole batch: the union of the ranks' shares is
the one-process batch, image for image and bit for bit.
"""
import numpy as np

from .augment import eval_transform, train_transform
from .errors import DataError

SHUFFLE, AUGMENT = 0, 1


class BatchStream:
    """Infinite, epoch-wise shuffled (images float32 NHWC, labels int64) batches, augmented
    (unless `augment` is off; `crop` and `flip` each) and normalised by `normalize`.

    The last incomplete batch of each epoch is dropped, so every batch has the fixed
    size a compiled executable expects.
    """

    def __init__(self, dataset, batch_size, seed, augment=True, start_step=0, rank=0, ranks=1,
                 crop=True, flip=True, normalize=None):
        self.images, self.labels = dataset.train_images, dataset.train_labels
        if not 0 < batch_size <= len(self.labels):
            raise DataError(f"batch size {batch_size} must be between 1 and the "
                            f"{len(self.labels)} training images of {dataset.name}")
        if batch_size % ranks:
            raise DataError(f"the global batch size {batch_size} does not split evenly "
                            f"across {ranks} ranks")
        share = batch_size // ranks
        self.share = slice(rank * share, (rank + 1) * share)
        self.batch_size = batch_size
        self.seed = seed
        self.augment = augment
        self.crop, self.flip = crop, flip
        self.normalize = normalize  # None: the seed's per-image standardization
        self.step = start_step
        self.steps_per_epoch = len(self.labels) // batch_size
        self._epoch_order = (None, None)

    def __iter__(self):
        return self

    def __next__(self):
        batch = self.batch(self.step)
        self.step += 1
        return batch

    def state(self):
        """What a checkpoint needs to resume: pass step back as start_step."""
        return {"seed": self.seed, "step": self.step}

    def batch(self, step):
        epoch, index = divmod(step, self.steps_per_epoch)
        picks = self._order(epoch)[index * self.batch_size:(index + 1) * self.batch_size]
        mine = picks[self.share]
        if self.augment:
            rng = np.random.default_rng([self.seed, AUGMENT, step])
            return (train_transform(self.images[mine], rng,
                                    of_batch=(self.share.start, self.batch_size),
                                    crop=self.crop, flip=self.flip, normalize=self.normalize),
                    self.labels[mine])
        return eval_transform(self.images[mine], self.normalize), self.labels[mine]

    def _order(self, epoch):
        # Consecutive steps share an epoch, so keep its permutation around.
        cached_epoch, order = self._epoch_order
        if cached_epoch != epoch:
            rng = np.random.default_rng([self.seed, SHUFFLE, epoch])
            order = rng.permutation(len(self.labels))
            self._epoch_order = (epoch, order)
        return order


def eval_batches(images, labels, batch_size, normalize=None):
    """Normalised (images, labels) in order (`normalize`, default the seed's per-image
    standardization); the last batch may be smaller."""
    for start in range(0, len(labels), batch_size):
        stop = start + batch_size
        yield eval_transform(images[start:stop], normalize), labels[start:stop]
