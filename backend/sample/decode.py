"""A batch of rows decoding together: rows join after a chunked prefill, and leave, at any step.

Joining rows are prefilled in groups (left-padded to the group's longest prompt; on hybrid
models, whose recurrent layers must never see a pad (see kv_cache.py), one group per distinct
prompt), in chunks of at most ``prefill_tokens`` tokens, one chunk per call of ``prefill_step``:
the caller interleaves them with decode steps, so a long prompt does not stall the rows
already decoding. A group's last chunk picks its rows' first tokens and moves their cache
into the decode cache (slot_cache.py), where rows sit in slots and leave without anyone
being re-padded. Token choice is batched (choose.py), stop strings are matched on the new
text only (stops.py).

Rows of a group with the same adapter and the same prompt (the n samples of one prompt, the
usual RL case) are prefilled once: the group's forward runs its distinct prompts only, and
each row gets its own copy of its prompt's cache and draws its own first token from the
shared logits. A prompt's cache depends on nothing but the adapter and the tokens, so this
changes no row's result; it divides the prefill's work by the number of samples.

A decode step that fails (out of memory as the cache grows, say) is retried on halves of
the batch, recursively, so the rows that can go on do; a row that fails even alone is
the culprit, and only it is failed (``on_fail``). The other rows' tokens are exactly those
of an undisturbed step: each row's computation does not depend on its batch company.
"""

from __future__ import annotations

import secrets
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from backend.lora.layer import MultiLoraLinear
from backend.lora.routing import Routing, use_adapters
from backend.sample import kv_cache
from backend.sample.choose import RowParams, choose, uniform
from backend.sample.sampling import Completion, SampleRow, check_prompts
from backend.sample.slot_cache import SlotCache
from backend.sample.stops import StopMatcher, cut_at_stop
from backend.train.output_head import PLAIN_HEAD_MODELS

PREFILL_TOKENS = 512  # tokens per prefill chunk (a group of B rows advances 512 // B columns)


@dataclass
class LiveRow:
    row: SampleRow
    budget: int  # most tokens it may still produce: max_tokens, within the context window
    seed: int
    on_done: Callable[[LiveRow], None] = field(default=lambda live: None)
    # Called instead of on_done when a decode step fails for this row even alone.
    on_fail: Callable[[LiveRow, BaseException], None] = field(default=lambda live, exc: None)
    # True once nobody wants this row any more (its request failed): dropped at the next step.
    abandoned: Callable[[], bool] = field(default=lambda: False)
    completion: Completion = field(default_factory=Completion)
    text_final: bool = False  # text already cut at a stop string
    stops: StopMatcher | None = None
    draws: int = 0  # tokens chosen so far: the counter of its random stream


@dataclass
class PrefillGroup:
    """Rows being prefilled together; ``done`` columns of ``ids_UL`` are in ``cache``. The
    forward runs the U distinct (adapter, prompt) pairs of the group's B rows."""

    rows: list[LiveRow]  # B rows
    source: list[int]  # (B,) each row's prompt among the U distinct ones
    unique: list[LiveRow]  # (U,) the first row of each distinct prompt: its adapter and tokens
    ids_UL: torch.Tensor  # (U, L) left-padded prompts
    mask_UL: torch.Tensor  # (U, L) 1 on real tokens
    cache: object
    done: int = 0


class DecodeBatch:
    def __init__(
        self, model: nn.Module, tokenizer, eos_ids: set[int], device: torch.device, prefill_tokens: int = PREFILL_TOKENS
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.device = device
        self.prefill_tokens = prefill_tokens
        self.rows: list[LiveRow] = []  # decoding rows, in slot order
        self.prefilling: deque[PrefillGroup] = deque()
        self.cache: SlotCache | None = None
        self.next_tokens: list[int] = []  # (B,) the token each row feeds next
        self._params: RowParams | None = None  # the decoding rows' parameters; None: rebuild
        self.vocab = int(model.get_input_embeddings().weight.shape[0])
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

    def waiting(self) -> int:
        """Rows still being prefilled."""
        return sum(len(g.rows) for g in self.prefilling)

    def make_row(self, row: SampleRow, context_length: int, on_done=None, on_fail=None, abandoned=None) -> LiveRow:
        seed = row.params.seed if row.params.seed is not None else secrets.randbits(63)
        budget = min(row.params.max_tokens, context_length - len(row.prompt_tokens))
        live = LiveRow(row, budget, seed)
        if row.params.stop:
            live.stops = StopMatcher(self.tokenizer, row.params.stop)
        if on_done is not None:
            live.on_done = on_done
        if on_fail is not None:
            live.on_fail = on_fail
        if abandoned is not None:
            live.abandoned = abandoned
        return live

    def enqueue(self, new_rows: Sequence[LiveRow], merge: bool = True) -> list[PrefillGroup]:
        """Queue ``new_rows`` for prefill (as one group, or one per row on hybrid models).
        ``merge``: join the newest queued group instead when its prefill has not started
        (requests arriving a step apart are then prefilled together)."""
        if not new_rows:
            return []
        if merge and not self._recurrent and self.prefilling and self.prefilling[-1].done == 0:
            new_rows = [*self.prefilling.pop().rows, *new_rows]
        if self._recurrent:  # no padding: one group per distinct prompt
            by_prompt: dict[tuple, list[LiveRow]] = {}
            for live in new_rows:
                by_prompt.setdefault(_prompt_key(live), []).append(live)
            groups = list(by_prompt.values())
        else:
            # Each adapter's rows side by side (in order of first appearance): every layer's
            # LoRA then reads one contiguous run of rows per adapter, not a gather and a scatter.
            first_seen: dict[str | None, int] = {}
            groups = [sorted(new_rows, key=lambda live: first_seen.setdefault(live.row.adapter_id, len(first_seen)))]
        made = []
        pad = self.tokenizer.pad_token_id
        for rows in groups:
            first: dict[tuple, int] = {}  # distinct prompt -> its index among the unique ones
            source = [first.setdefault(_prompt_key(live), len(first)) for live in rows]
            unique = [rows[source.index(u)] for u in range(len(first))]
            width = max(len(r.row.prompt_tokens) for r in unique)
            ids_UL = torch.full((len(unique), width), pad, dtype=torch.long)
            mask_UL = torch.zeros((len(unique), width), dtype=torch.long)
            for i, live in enumerate(unique):
                n = len(live.row.prompt_tokens)
                ids_UL[i, width - n :] = torch.tensor(live.row.prompt_tokens)
                mask_UL[i, width - n :] = 1
            cache = kv_cache.new_cache(self.model, self._recurrent)
            made.append(PrefillGroup(rows, source, unique, ids_UL.to(self.device), mask_UL.to(self.device), cache))
        self.prefilling.extend(made)
        return made

    @torch.no_grad()
    def admit(self, new_rows: Sequence[LiveRow]) -> None:
        """Prefill ``new_rows`` now, every chunk, and move the ones still going into the batch."""
        for group in self.enqueue(new_rows):
            while group in self.prefilling:
                self.prefill_step(group)

    @torch.no_grad()
    def prefill_step(self, group: PrefillGroup | None = None) -> int:
        """Run the next chunk of ``group`` (default: the oldest). On its last chunk the group's
        rows get their first token and join the decode batch. If the forward raises, the
        group is dropped from the queue (its cache is half-grown) and the error propagates.
        Returns the tokens (padding included) the chunk ran."""
        group = group or self.prefilling[0]
        if all(live.abandoned() for live in group.rows):
            self.prefilling.remove(group)
            return 0
        rows, width = len(group.unique), group.ids_UL.shape[1]
        end = min(width, group.done + max(1, self.prefill_tokens // rows))
        ran = rows * (end - group.done)
        try:
            logits_UV = self._forward(
                group.unique, group.ids_UL[:, group.done : end], group.mask_UL[:, :end], group.cache, end == width
            )
        except BaseException:
            self.prefilling.remove(group)
            raise
        group.done = end
        if end < width:
            return ran
        self.prefilling.remove(group)
        source = torch.tensor(group.source, device=logits_UV.device)
        logits_BV = logits_UV if len(group.unique) == len(group.rows) else logits_UV.index_select(0, source)
        going, first_tokens = self._advance(group.rows, logits_BV, self._row_params(group.rows))
        pairs = [(j, t) for j, t in zip(going, first_tokens, strict=True) if not group.rows[j].abandoned()]
        keep, tokens = [j for j, _ in pairs], [t for _, t in pairs]
        if not keep:
            return ran
        if self.cache is None:
            self.cache = SlotCache(group.cache, self.device)
        lengths = [len(group.rows[j].row.prompt_tokens) for j in keep]
        self.cache.join(group.cache, group.mask_UL, [group.source[j] for j in keep], lengths)
        self.rows += [group.rows[j] for j in keep]
        self.next_tokens += tokens
        self._params = None
        return ran

    @torch.no_grad()
    def step(self) -> None:
        """Feed every decoding row its next token and choose the one after. Rows whose
        forward fails even alone are dropped and told so (``on_fail``); the others go on."""
        self.discard([j for j, live in enumerate(self.rows) if live.abandoned()])
        if not self.rows:
            return
        cache = self.cache
        ids_B1 = torch.tensor(self.next_tokens, device=self.device).unsqueeze(1)
        cache.advance_mask()
        held = kv_cache.hold_states(cache)  # recurrent states change in place: keep the old ones
        try:
            logits_BV = self._forward(self.rows, ids_B1, None, cache, True)
            held = []  # the old states are not needed any more
        except Exception as exc:  # noqa: BLE001 - retried on parts of the batch; the culprit fails alone
            _drop_frames(exc)
            kv_cache.restore_states(held)
            logits_BV = self._step_in_parts(ids_B1, exc)
            if logits_BV is None:
                return
        cache.advance()
        keep, tokens = self._advance(self.rows, logits_BV, self._row_params(self.rows))
        self.next_tokens = self._keep(keep, tokens)

    def discard(self, positions: Sequence[int]) -> None:
        """Drop the decoding rows at these batch positions, unfinished (their caller gave up on them)."""
        gone = set(positions)
        if gone:
            keep = [j for j in range(len(self.rows)) if j not in gone]
            self.next_tokens = self._keep(keep, [self.next_tokens[j] for j in keep])

    def clear(self) -> None:
        """Drop every row, decoding or waiting (after an error in a forward pass)."""
        self.rows, self.next_tokens, self._params = [], [], None
        self.prefilling.clear()
        if self.cache is not None:
            self.cache.clear()

    # ---- internals -------------------------------------------------------------------

    def _row_params(self, rows: Sequence[LiveRow]) -> RowParams:
        if rows is not self.rows:
            return RowParams.build([r.row.params for r in rows], self.vocab, self.device)
        if self._params is None:
            self._params = RowParams.build([r.row.params for r in rows], self.vocab, self.device)
        return self._params

    def _keep(self, keep: list[int], tokens: list[int]) -> list[int]:
        """Keep the decoding rows at ``keep`` (ascending), whose next tokens are ``tokens``.
        Survivors above the new row count move into the slots of rows that left, so only
        they are copied. Returns the tokens in the new row order."""
        if len(keep) == len(self.rows):
            return tokens
        count, token_of = len(keep), dict(zip(keep, tokens, strict=True))
        movers = iter([j for j in keep if j >= count])
        order = [j if j in token_of else next(movers) for j in range(count)]
        self.cache.keep_rows(order)
        self.rows = [self.rows[j] for j in order]
        self._params = None
        return [token_of[j] for j in order]

    def _step_in_parts(self, ids_B1, error: Exception) -> torch.Tensor | None:
        """After a failed step over the whole batch (recurrent states put back): run it on
        halves, recursively; rows that fail alone leave the batch via on_fail. Returns the
        survivors' logits (B', V), the batch reduced to them; None if none."""
        done: list[tuple[int, int, SlotCache, torch.Tensor]] = []  # (start, stop, part's cache, logits)
        failed: list[tuple[int, Exception]] = []
        self._run_parts(0, len(self.rows), ids_B1, error, done, failed)
        ok = [j for start, stop, _, _ in done for j in range(start, stop)]
        culprits = [(self.rows[j], exc) for j, exc in failed]
        self.cache.take_part_states([part for _, _, part, _ in done])  # the survivors' recurrent states
        logits_BV = torch.cat([logits for _, _, _, logits in done]) if done else None
        self._drop_failed(ok)
        for live, exc in culprits:
            live.on_fail(live, exc)
        return logits_BV

    def _drop_failed(self, ok: list[int]) -> None:
        """Only the rows ``ok`` (in order) go on; recurrent states already hold just them."""
        self.cache.keep_rows(ok, states_done=True)
        self.rows = [self.rows[j] for j in ok]
        self.next_tokens = [self.next_tokens[j] for j in ok]
        self._params = None

    def _run_parts(self, start: int, stop: int, ids_B1, error: Exception, done: list, failed: list) -> None:
        """Rows [start, stop) failed together with ``error``: try each half on its own."""
        if stop - start == 1:
            failed.append((start, error))
            return
        middle = (start + stop) // 2
        for a, b in ((start, middle), (middle, stop)):
            part = self.cache.part(a, b)
            try:
                logits_BV = self._forward(self.rows[a:b], ids_B1[a:b], None, part, True)
            except Exception as exc:  # noqa: BLE001
                _drop_frames(exc)
                del part
                self._run_parts(a, b, ids_B1, exc, done, failed)
                continue
            done.append((a, b, part, logits_BV))

    def _forward(self, rows: Sequence[LiveRow], ids_BL, mask_BL, cache, want_logits: bool) -> torch.Tensor | None:
        """A forward of ``rows``: a prefill chunk (``mask_BL`` (B, past + L) given) or a decode
        step on the slot cache (mask and positions from it). Returns the last position's
        logits (B, V) when ``want_logits``."""
        if mask_BL is None:
            mask_BL, positions_BL = cache.attention_mask(), cache.positions()
        else:
            positions_BL = (mask_BL.cumsum(-1) - 1).clamp(min=0)[:, -ids_BL.shape[1] :]
        # The step's routing, built once: its token segments serve every layer (the head,
        # which sees one token per row, gets its own on first use).
        routing = Routing.build([r.row.adapter_id for r in rows], self.device, tokens_per_row=ids_BL.shape[1])
        adapters = routing.adapters
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
                return out.logits[:, -1, :].float() if want_logits else None  # (B, V)
            out = self.model.model(
                input_ids=ids_BL, attention_mask=mask_BL, position_ids=positions_BL, cache=cache, use_cache=True
            )
            if not want_logits:
                return None
            hidden_B1H = out.last_hidden_state[:, -1:, :]
            head = self.model.get_output_embeddings()
            if any(head.lora_A.get(a) is not None for a in adapters):
                return head(hidden_B1H)[:, -1, :].float()  # LoRA on the head: route rows through it
            # (V, H) @ (H, B): on CPU this runs ~1.7x faster than linear() for a few rows.
            # .contiguous(): each row's logits are then read whole, not at a stride of B.
            return (head.base.weight @ hidden_B1H[:, -1, :].t()).t().contiguous().float()

    def _advance(
        self, rows: Sequence[LiveRow], logits_BV: torch.Tensor, params: RowParams
    ) -> tuple[list[int], list[int]]:
        """Choose each row's next token (one transfer for all); finish rows that are done.
        Returns the batch positions of rows that go on and the tokens they feed next."""
        draws = [uniform(live.seed, live.draws) for live in rows]
        chosen, logprobs = choose(logits_BV, params, draws)
        keep, tokens = [], []
        for j, live in enumerate(rows):
            live.draws += 1
            if self._append(live, chosen[j], logprobs[j]):
                if not live.text_final:
                    live.completion.text = self.tokenizer.decode(live.completion.tokens, skip_special_tokens=True)
                live.on_done(live)
            else:
                keep.append(j)
                tokens.append(chosen[j])
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
        if live.stops is not None and live.stops.feed(result.tokens):
            text = self.tokenizer.decode(result.tokens, skip_special_tokens=True)
            cut = cut_at_stop(text, params.stop)
            if cut >= 0:
                result.text, result.stop_reason, live.text_final = text[:cut], "stop", True
                return True
        if len(result.tokens) >= live.budget:
            result.stop_reason = "length"
            return True
        return False


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


def _prompt_key(live: LiveRow) -> tuple:
    """Rows with equal keys have equal prompt caches: the same adapter, the same tokens."""
    return (live.row.adapter_id, tuple(live.row.prompt_tokens))
