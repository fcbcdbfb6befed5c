"""The sequential engine: the reference, a plain loop over the round's clients.

Both engines run the same `ClientRunner` (one model workspace, the tokenizer, the
composed word table per vocabulary version, and a bounded cache of users' word streams)
and hand each result to `consume(task, result)` as soon as it exists, so the caller can
sum it and drop it: memory stays flat in the number of clients.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from federation.client import ClientResult, client_update, user_stream
from federation.config import ClientConfig
from federation.device import Device
from federation.memory import keep_buffers_in_heap
from models import native
from models.lm import LMConfig, WordLM, WordTable
from models.tokenizer import Tokenizer
from models.vocab import Vocabulary


@dataclass(frozen=True)
class ClientTask:
    slot: int  # position in the round's report order
    device: int  # population index (the secure-aggregation identity)
    real_id: str  # device folder to read
    seed: int  # the client's generator seed (drawn by the server's generator: engine-independent)


# consume(task, result): the result's delta may live in an engine's buffer that is reused once the
# call returns (the parallel engine's shared memory): a consumer copies what it keeps
Consume = Callable[[ClientTask, ClientResult], None]


class ClientRunner:
    """Everything one process needs to run client updates, loaded once."""

    def __init__(self, model_cfg: LMConfig, tokenizer_path: Path, devices_root: Path, cfg: ClientConfig, cache_users: int = 512):
        native.load()  # fused training kernels where this machine can build them (models/native.py)
        keep_buffers_in_heap()  # a step's buffers reused, not faulted in afresh (federation/memory.py)
        self.model = WordLM(model_cfg)
        self.tokenizer = Tokenizer(tokenizer_path)
        self.root = Path(devices_root)
        self.cfg = cfg
        self.vocab: Vocabulary | None = None
        self.table: WordTable | None = None
        self.streams: OrderedDict[str, Tensor] = OrderedDict()  # LRU of encoded histories (current vocab)
        self.cache_users = cache_users

    def set_vocab(self, vocab: Vocabulary) -> None:
        if self.vocab is not None and self.vocab.version == vocab.version and len(self.vocab) == len(vocab):
            return
        self.vocab = vocab
        self.table = WordTable.build(vocab, self.tokenizer, self.model.cfg.base_vocab)
        self.streams.clear()

    def stream(self, real_id: str) -> Tensor:
        s = self.streams.get(real_id)
        if s is None:
            s = user_stream(Device(self.root, real_id).history(), self.vocab, self.cfg)
            self.streams[real_id] = s
            if len(self.streams) > self.cache_users:
                self.streams.popitem(last=False)
        else:
            self.streams.move_to_end(real_id)
        return s

    def run(self, global_params: dict[str, Tensor], task: ClientTask, out: dict[str, Tensor] | None = None) -> ClientResult:
        """One client's update; its delta written into `out`'s tensors when given."""
        gen = torch.Generator().manual_seed(task.seed)
        res = client_update(global_params, self.model, self.vocab, self.tokenizer, (), self.cfg, gen,
                            table=self.table, stream=self.stream(task.real_id), out=out)
        res.slot = task.slot
        return res


class SequentialEngine:
    name = "sequential"

    def __init__(self, model_cfg: LMConfig, tokenizer_path: Path, devices_root: Path, cfg: ClientConfig):
        self.runner = ClientRunner(model_cfg, tokenizer_path, devices_root, cfg)

    def run(self, global_params: dict[str, Tensor], vocab: Vocabulary, tasks: Sequence[ClientTask], consume: Consume) -> None:
        self.runner.set_vocab(vocab)
        for task in tasks:
            consume(task, self.runner.run(global_params, task))

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
