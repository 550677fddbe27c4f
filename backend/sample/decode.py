"""A batch of rows decoding together: one KV cache, rows joining and leaving at any step.

Rows are left-padded so every row's next token sits in the last column. New rows are
prefilled as a group (one by one on hybrid models, whose recurrent layers must never see
a pad: see kv_cache.py) and merged into the running batch (caches left-padded to a common
length, padding masked out); finished rows are dropped from the cache at once, so they
stop costing compute, and columns that are padding for every remaining row are trimmed.

A decode step that fails (out of memory as the cache grows, say) is retried on halves of
the batch, recursively, so the rows that can go on do; a row that fails even alone is
the culprit, and only it is failed (``on_fail``). The other rows' tokens are exactly those
of an undisturbed step: each row's computation does not depend on its batch company.
"""

from __future__ import annotations

import secrets
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from backend.lora.layer import MultiLoraLinear
from backend.lora.routing import Routing, use_adapters
from backend.sample import kv_cache
from backend.sample.sampling import Completion, SampleRow, check_prompts, choose_token
from backend.train.output_head import PLAIN_HEAD_MODELS


@dataclass
class LiveRow:
    row: SampleRow
    budget: int  # most tokens it may still produce: max_tokens, within the context window
    generator: torch.Generator
    on_done: Callable[[LiveRow], None] = field(default=lambda live: None)
    # Called instead of on_done when a decode step fails for this row even alone.
    on_fail: Callable[[LiveRow, BaseException], None] = field(default=lambda live, exc: None)
    # True once nobody wants this row any more (its request failed): dropped at the next step.
    abandoned: Callable[[], bool] = field(default=lambda: False)
    completion: Completion = field(default_factory=Completion)
    text_final: bool = False  # text already cut at a stop string


class DecodeBatch:
    def __init__(self, model: nn.Module, tokenizer, eos_ids: set[int], device: torch.device) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.device = device
        self.rows: list[LiveRow] = []  # live rows, in batch order
        self.cache = None
        self.mask_BL: torch.Tensor | None = None  # (B, L) 1 where a cached position is real
        self.next_tokens: list[int] = []  # (B,) the token each row feeds next
        # Llama-style heads (logits = head(last hidden state), see losses.PLAIN_HEAD_MODELS)
        # wrapped for LoRA: the last position's logits are computed here.
        head = model.get_output_embeddings()
        self._plain_head = (
            type(model).__name__ in PLAIN_HEAD_MODELS
            and isinstance(head, MultiLoraLinear)
            and getattr(head.base, "bias", None) is None  # the shortcut below is weight-only
        )
        # Hybrid models (recurrent/linear-attention layers besides attention ones, e.g. Qwen3.5)
        self._recurrent = kv_cache.has_recurrent(kv_cache.new_cache(model))

    def __len__(self) -> int:
        return len(self.rows)

    def make_row(self, row: SampleRow, context_length: int, on_done=None, on_fail=None, abandoned=None) -> LiveRow:
        seed = row.params.seed if row.params.seed is not None else secrets.randbits(63)
        budget = min(row.params.max_tokens, context_length - len(row.prompt_tokens))
        live = LiveRow(row, budget, torch.Generator(device=self.device).manual_seed(seed))
        if on_done is not None:
            live.on_done = on_done
        if on_fail is not None:
            live.on_fail = on_fail
        if abandoned is not None:
            live.abandoned = abandoned
        return live

    @torch.no_grad()
    def admit(self, new_rows: Sequence[LiveRow]) -> None:
        """Prefill ``new_rows`` together and merge the ones still going into the batch."""
        if not new_rows:
            return
        if self._recurrent and len(new_rows) > 1:
            # A left pad fed through a recurrent layer would change its state (a padding mask
            # only makes that harmless for some models): each row is prefilled alone.
            for live in new_rows:
                self.admit([live])
            return
        pad = self.tokenizer.pad_token_id
        width = max(len(r.row.prompt_tokens) for r in new_rows)
        ids_BL = torch.full((len(new_rows), width), pad, dtype=torch.long)
        mask_BL = torch.zeros((len(new_rows), width), dtype=torch.long)
        for i, live in enumerate(new_rows):
            n = len(live.row.prompt_tokens)
            ids_BL[i, width - n:] = torch.tensor(live.row.prompt_tokens)
            mask_BL[i, width - n:] = 1
        ids_BL, mask_BL = ids_BL.to(self.device), mask_BL.to(self.device)
        cache = kv_cache.new_cache(self.model, self._recurrent)
        logits_BV = self._forward(new_rows, ids_BL, mask_BL, cache)
        keep, tokens = self._advance(new_rows, logits_BV)
        if not keep:
            return
        kv_cache.select_rows(cache, torch.tensor(keep, device=self.device))
        mask_BL = mask_BL[keep]
        survivors = [new_rows[j] for j in keep]
        if self.cache is None:
            self.cache, self.mask_BL = cache, mask_BL
        else:
            self._merge(cache, mask_BL)
        self.rows += survivors
        self.next_tokens += tokens

    @torch.no_grad()
    def step(self) -> None:
        """Feed every row its next token and choose the one after. Rows whose forward
        fails even alone are dropped and told so (``on_fail``); the others go on."""
        self.discard([j for j, live in enumerate(self.rows) if live.abandoned()])
        if not self.rows:
            return
        length = self.mask_BL.shape[1]
        mask_BL = torch.cat([self.mask_BL, self.mask_BL.new_ones(len(self.rows), 1)], dim=1)
        ids_B1 = torch.tensor(self.next_tokens, device=self.device).unsqueeze(1)
        held = kv_cache.hold_states(self.cache)  # recurrent states change in place: keep the old ones
        try:
            logits_BV = self._forward(self.rows, ids_B1, mask_BL, self.cache)
            self.mask_BL = mask_BL
            held = []  # the old states are not needed any more
        except Exception as exc:  # noqa: BLE001 - retried on parts of the batch; the culprit fails alone
            _drop_frames(exc)
            kv_cache.truncate(self.cache, length)  # layers the failed pass already grew go back to ``length``
            kv_cache.restore_states(held)
            logits_BV = self._step_in_parts(ids_B1, mask_BL, exc)
            if logits_BV is None:
                return
        keep, tokens = self._advance(self.rows, logits_BV)
        if len(keep) < len(self.rows):
            self._select(keep)
        self.next_tokens = tokens

    def discard(self, positions: Sequence[int]) -> None:
        """Drop the rows at these batch positions, unfinished (their caller gave up on them)."""
        gone = set(positions)
        if gone:
            keep = [j for j in range(len(self.rows)) if j not in gone]
            self._select(keep)
            self.next_tokens = [self.next_tokens[j] for j in keep]

    def clear(self) -> None:
        """Drop every row (after an error in a forward pass)."""
        self.rows, self.next_tokens = [], []
        self.cache = self.mask_BL = None

    # ---- internals -------------------------------------------------------------------

    def _step_in_parts(self, ids_B1, mask_BL, error: Exception) -> torch.Tensor | None:
        """After a failed step over the whole batch (cache back at its old length): run
        it on halves, recursively; rows that fail alone leave the batch via on_fail.
        Returns the survivors' logits (B', V), the batch reduced to them; None if none."""
        done: list[tuple[int, int, object, torch.Tensor]] = []  # (start, stop, part's cache, logits)
        failed: list[tuple[int, Exception]] = []
        self._run_parts(0, len(self.rows), ids_B1, mask_BL, error, done, failed)
        ok = [j for start, stop, _, _ in done for j in range(start, stop)]
        culprits = [(self.rows[j], exc) for j, exc in failed]
        self.rows = [self.rows[j] for j in ok]
        self.next_tokens = [self.next_tokens[j] for j in ok]
        if ok:
            # The parts' grown caches, stacked back in batch order; the old cache goes with them.
            kv_cache.stack_parts(self.cache, [part for _, _, part, _ in done])
            self.mask_BL = mask_BL[torch.tensor(ok, device=self.device)]
            logits_BV = torch.cat([logits for _, _, _, logits in done])
        else:
            self.cache = self.mask_BL = None
            logits_BV = None
        for live, exc in culprits:
            live.on_fail(live, exc)
        return logits_BV

    def _run_parts(self, start: int, stop: int, ids_B1, mask_BL, error: Exception, done: list, failed: list) -> None:
        """Rows [start, stop) failed together with ``error``: try each half on its own."""
        if stop - start == 1:
            failed.append((start, error))
            return
        middle = (start + stop) // 2
        for a, b in ((start, middle), (middle, stop)):
            part = kv_cache.part_view(self.cache, a, b)
            try:
                logits_BV = self._forward(self.rows[a:b], ids_B1[a:b], mask_BL[a:b], part)
            except Exception as exc:  # noqa: BLE001
                _drop_frames(exc)
                del part
                self._run_parts(a, b, ids_B1, mask_BL, exc, done, failed)
                continue
            done.append((a, b, part, logits_BV))

    def _forward(self, rows: Sequence[LiveRow], ids_BL, mask_BL, cache) -> torch.Tensor:
        # The step's routing, built once: its token segments serve every layer (the head,
        # which sees one token per row, gets its own on first use).
        routing = Routing.build([r.row.adapter_id for r in rows], self.device, tokens_per_row=ids_BL.shape[1])
        adapters = routing.adapters
        positions_BL = (mask_BL.cumsum(-1) - 1).clamp(min=0)[:, -ids_BL.shape[1]:]
        with use_adapters(routing):
            if not self._plain_head:
                out = self.model(
                    input_ids=ids_BL,
                    attention_mask=mask_BL,
                    position_ids=positions_BL,
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,  # only the last position is sampled from
                )
                return out.logits[:, -1, :].float()  # (B, V)
            out = self.model.model(
                input_ids=ids_BL, attention_mask=mask_BL, position_ids=positions_BL, cache=cache, use_cache=True
            )
            hidden_B1H = out.last_hidden_state[:, -1:, :]
            head = self.model.get_output_embeddings()
            if any(head.lora_A.get(a) is not None for a in adapters):
                return head(hidden_B1H)[:, -1, :].float()  # LoRA on the head: route rows through it
            # (V, H) @ (H, B): on CPU this runs ~1.7x faster than linear() for a few rows.
            # .contiguous(): each row's logits are then read whole, not at a stride of B.
            return (head.base.weight @ hidden_B1H[:, -1, :].t()).t().contiguous().float()

    def _advance(self, rows: Sequence[LiveRow], logits_BV: torch.Tensor) -> tuple[list[int], list[int]]:
        """Choose each row's next token; finish rows that are done. Returns the batch
        positions of rows that go on and the tokens they feed next."""
        keep, tokens = [], []
        for j, live in enumerate(rows):
            token, logprob = choose_token(logits_BV[j], live.row.params, live.generator)
            done = self._append(live, token, logprob)
            if done:
                if not live.text_final:
                    live.completion.text = self.tokenizer.decode(live.completion.tokens, skip_special_tokens=True)
                live.on_done(live)
            else:
                keep.append(j)
                tokens.append(token)
        return keep, tokens

    def _append(self, live: LiveRow, token: int, logprob: float) -> bool:
        result, params = live.completion, live.row.params
        if token in params.stop_token_ids or (params.stop_at_eos and token in self.eos_ids):
            result.stop_reason = "stop"
            if params.keep_stop_token:
                result.tokens.append(token)
                result.logprobs.append(logprob)
            return True
        result.tokens.append(token)
        result.logprobs.append(logprob)
        stops = live.row.params.stop
        if stops:
            text = self.tokenizer.decode(result.tokens, skip_special_tokens=True)
            cut = min((text.find(s) for s in stops if s in text), default=-1)
            if cut >= 0:
                result.text, result.stop_reason, live.text_final = text[:cut], "stop", True
                return True
        if len(result.tokens) >= live.budget:
            result.stop_reason = "length"
            return True
        return False

    def _select(self, keep: list[int]) -> None:
        index = torch.tensor(keep, device=self.device)
        self.rows = [self.rows[j] for j in keep]
        if not keep:
            self.cache = self.mask_BL = None
            return
        kv_cache.select_rows(self.cache, index)
        mask_BL = self.mask_BL[index]
        first = int(mask_BL.any(dim=0).long().argmax())  # leading columns nobody needs
        if first > 0:
            kv_cache.trim_left(self.cache, first)
            mask_BL = mask_BL[:, first:]
        self.mask_BL = mask_BL

    def _merge(self, cache, mask_BL: torch.Tensor) -> None:
        """Append another cache's rows: left-pad both to one length, then stack rows."""
        length = max(self.mask_BL.shape[1], mask_BL.shape[1])
        pad_old, pad_new = length - self.mask_BL.shape[1], length - mask_BL.shape[1]
        kv_cache.merge(self.cache, cache, pad_old, pad_new)
        self.mask_BL = torch.cat([F.pad(self.mask_BL, (pad_old, 0)), F.pad(mask_BL, (pad_new, 0))])


def generate(
    model: nn.Module,
    tokenizer,
    rows: Sequence[SampleRow],
    eos_ids: set[int],
    context_length: int,
    device: torch.device,
) -> list[Completion]:
    """Generate for ``rows`` as one batch, start to finish (no rows join later)."""
    check_prompts(rows, context_length)
    batch = DecodeBatch(model, tokenizer, eos_ids, device)
    live = [batch.make_row(row, context_length) for row in rows]
    batch.admit(live)
    while len(batch):
        batch.step()
    return [r.completion for r in live]


def _drop_frames(exc: BaseException) -> None:
    """Free the tensors a failed forward's frames still hold (its activations), keeping
    the traceback's text: the retry needs that memory."""
    traceback.clear_frames(exc.__traceback__)
