"""A deepdelta model as lm-evaluation-harness's ``LM``.

``TemplateLM`` (the harness's) turns (context, continuation) strings into token lists; this
class scores them. Requests are sorted by length and batched (the harness's ``Collator``),
right-padded (a causal model's earlier positions never see the padding), cropped on the left
to the model's ``block_size``, and run under bf16 autocast on a GPU. ``loglikelihood_rolling``
uses the harness's rolling windows; ``generate_until`` decodes with the model's caches
(``deepdelta.model.decode``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import Collator
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from deepdelta.data.tokenizer import Tokenizer
from deepdelta.model import DeltaTransformer


class DeepDeltaLM(TemplateLM):
    def __init__(
        self, model: DeltaTransformer, tokenizer: Tokenizer, batch_size: int = 16, max_gen_toks: int = 256
    ) -> None:
        super().__init__()
        self.model = model.eval()
        self.tok = tokenizer
        self.batch_size = int(batch_size)
        self.max_length = model.config.block_size
        self.max_gen_toks = int(max_gen_toks)
        self._device = next(model.parameters()).device

    @property
    def eot_token_id(self) -> int:
        return int(self.tok.eot_id)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return [int(i) for i in self.tok.encode_batch([string])[0][1:]]  # encode_batch prepends the EOT

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens)

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self._device.type, dtype=torch.bfloat16, enabled=self._device.type == "cuda")

    @torch.no_grad()
    def _logprobs(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """Log-softmax (len(row), vocab) of each row's next-token predictions, in fp32 (fp64 for fp64),
        left on the model's device: a row is a vocabulary wide (~70 MB at gpt2's 50304 × 340
        tokens), so only the continuation's few scores cross to the host."""
        width = max(len(r) for r in rows)
        idx = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            idx[i, : len(r)] = torch.tensor(r)
        with self._autocast():
            logits = self.model(idx.to(self._device))
        logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        return [logp[i, : len(r)] for i, r in enumerate(rows)]

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        def key(req: tuple) -> tuple[int, tuple[int, ...]]:
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        collator = Collator(requests, sort_fn=key)
        out = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood")
        for batch in collator.get_batched(n=self.batch_size):
            rows, spans = [], []
            for _, context, continuation in batch:
                whole = (context + continuation)[-(self.max_length + 1) :]
                rows.append(whole[:-1])
                spans.append((max(0, len(whole) - 1 - len(continuation)), whole))
            for (start, whole), logp in zip(spans, self._logprobs(rows), strict=True):
                scores = logp[start:]  # the predictions of the continuation's tokens
                target = torch.tensor(whole[start + 1 :], device=scores.device)
                total = scores.gather(1, target[:, None]).sum().item()
                out.append((total, bool((scores.argmax(-1) == target).all())))
                bar.update(1)
        bar.close()
        return collator.get_original(out)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (text,) in tqdm([r.args for r in requests], disable=disable_tqdm, desc="loglikelihood_rolling"):
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    self.tok_encode(text), self.eot_token_id, max_seq_len=self.max_length, context_len=1
                )
            ]
            scores = self._loglikelihood_tokens([(("", ""), ctx, cont) for ctx, cont in windows], disable_tqdm=True)
            out.append(sum(s for s, _ in scores))
        return out

    @torch.no_grad()
    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        from deepdelta.model.decode import generate

        out = []
        for context, gen_kwargs in tqdm([r.args for r in requests], disable=disable_tqdm, desc="generate_until"):
            kwargs = dict(gen_kwargs)
            until = kwargs.get("until") or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
            prompt = self.tok_encode(context)[-(self.max_length - 1) :] or [self.eot_token_id]
            idx = torch.tensor([prompt], device=self._device)
            with self._autocast():
                tokens = generate(self.model, idx, max_new, temperature=temperature, stop_token_ids={self.eot_token_id})
            text = self.tok_decode([t for t in tokens[0, len(prompt) :].tolist() if t != self.eot_token_id])
            for stop in until:  # the harness's convention: cut at the first stop string
                if stop and stop in text:
                    text = text.split(stop)[0]
            out.append(text)
        return out
