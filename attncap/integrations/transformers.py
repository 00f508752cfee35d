"""transformers integration: an "attncap" attention function over the one shared capture path.

``register()`` adds "attncap" to transformers' AttentionInterface (and sdpa's mask builder under the same
name to AttentionMaskInterface, so padding/causal masks arrive as bool [B, 1, Nq, Nk] masks or None).
``attncap.capture(model)`` switches every config of the model to attn_implementation="attncap" for the
block (restored on exit) and routes each attention call to the session. Calls that are not captured
(steps or layers not asked for, dropout, position bias, flex block masks) run on the attention the model
was configured with (its eager function for eager-only models such as GPT-OSS, else SDPA); attention
sinks and logit softcapping are captured exactly (attncap.integrations.hf_attention). Capture never changes a model's outputs.

Layers are module paths: "model.language_model.layers.0.self_attn", "model.visual.blocks.0.attn",
"model.vision_tower.encoder.layers.0.self_attn", "encoder.layer.0.attention.self".
Each call of the model's forward is one step: a plain forward is step 0 (then 1, ...); in generate()
the prefill is step 0 and every generated token one more step (Nq = 1 with the KV cache). generate()
encodes the images before its first forward (get_image_features): that encoding, its tower records
and the media layout belong to the prefill's step, and the layout is kept for every decode step.

Token layouts (segments of a call, see attncap.session):
  language model   "text" (every non-media token, prompt and generated, in sequence order) and the
                   media placed at config.image_token_id / video_token_id (or a sub-config's, as
                   Phi-4-multimodal keeps it) by the family rules of attncap.integrations.vlm_media,
                   read from the inputs of get_image_features / get_video_features (Phi-4-multimodal:
                   of its image embedding module): one segment per image, tile and named piece
                   ("image" on its grid, anyres "base" tile and stitched grid, "image_newline",
                   Pixtral's "image_break" / "image_end"; Record.meta query_tag / key_tag say which;
                   tiles of Idefics3 / SmolVLM / Llama 4 say their place, read from the prompt's tile
                   markers: "tile 3 of 6: row 1, col 0 of 2x3", "global view"; InternVL / Aya Vision
                   warn that the arrangement is not in the model's inputs),
                   "audio" per run of audio tokens (no grid). A family without a rule, inputs a rule
                   does not explain, or tokens with no place on the image (Idefics2's perceiver
                   latents) give grid-less media segments and a warning.
  Mllama           its <|image|> token is text; the cross-attention layers' keys are the vision tower's
                   tiles, per image and tile a "cls" then an "image" (g, g) segment, tagged "tile j of n:
                   row r, col c of RxC" (aspect_ratio_ids) or "padding tile"; kept for every decode step (the keys are cached). auto: text->image. Text and media are
                   gathered into contiguous segments per batch element (a permutation of q/k/v rows and
                   of the mask, undone on the output), so "text->image" maps hold every text token.
                   auto relations: text->image / text->video, or text->text for a text-only model.
  Qwen2-VL towers  one attention call per image frame: "image->image" ("video->video") on the frame's
  (Kimi-K2.5)      (h, w) patch grid, rows reordered from the merge-block order the tower uses to
                   row-major. Qwen2.5-VL (and the Qwen2.5-Omni thinker): the full-attention blocks
                   (fullatt_block_indexes) the same way; a window-attention block calls attention once
                   per window (cu_window_seqlens): one segment per window on the window's own (rows,
                   cols) patch grid, row-major, tagged with its place on the frame ("window 1 of 6:
                   rows 0:4, cols 4:8 of (8, 12)", "frame f of t, " first for videos).
  ViT towers       "image" ("video" for a video's frames) on the (H/patch, W/patch) grid with a "cls"
                   segment where the tower puts its class token (first: CLIP, InternVL; last: Llama 4;
                   none: SigLIP); Pixtral packs every image of a call into one sequence: one "image"
                   segment per image; Mllama's tower holds an image's tiles, [cls, grid, "padding"] each.
                   Audio towers (Qwen-Omni): one "audio" segment per call. auto: image->image.
  perceivers       Idefics2's resampler: queries "latents"; keys "image" (the tower's patches, on its
                   (H/p, W/p) grid; without one, and a warning, when that grid is unknown) then "latents".
                   auto: latents->image. Other attention inside get_*_features: "tokens" (no auto relation).
  sinks            a "sink" key segment after the real keys: the probability each query gives the sink.
  layout=          a user layout (attncap.integrations.generic) replaces all of the above.

Refused before the forward, for the layers selected (layers=): attention modules in training mode with
attention dropout (random, not reproducible), and modules with attention sinks whose config shows logit
softcapping (no exact form of both). Limits: every batch element must have the same media structure (number of tokens per segment) for a
call to be captured (otherwise the call runs on the model's attention and a warning says so); caches
whose key length is not the sequence length (static or sliding-window caches) give a single "tokens"
key segment on VLMs. The permuted path materialises a bool mask [B, 1, Nq, Nk] for causal prefill of
a VLM prompt, and the sink path one of [B, 1, Nq, Nk + 1] whenever the call is masked or causal.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import warnings
from typing import Any

import torch

from ..session import CallLayout, CaptureSession, Segment
from .generic import GenericCapture, all_relations, check_layout, check_steps, layout_for
from .hf_attention import original_forward, sinks_of, with_sink
from .vlm_layouts import MEDIA, AudioTower, MergeTower, PatchTower, TileTower, TokenSequence, perceiver_layout
from .vlm_media import VIDEO_IN_IMAGE_TOKENS, media_items

ATTN = "attncap"
LM_DEFAULT_MEDIA = ("text->image", "text->video", "text->audio")
LM_DEFAULT_TEXT = ("text->text",)
TOWER_DEFAULT = ("image->image", "video->video", "audio->audio")

_ACTIVE: list["TransformersCapture"] = []
_UNSET = object()  # a method wrapped on a module that had no instance attribute of that name


def is_transformers_model(target: Any) -> bool:
    """A transformers PreTrainedModel (checked without importing transformers when it is not loaded)."""
    mu = sys.modules.get("transformers.modeling_utils")
    return mu is not None and isinstance(target, mu.PreTrainedModel)


def register() -> None:
    """Make attn_implementation="attncap" known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN, attncap_attention_forward)
    AttentionMaskInterface.register(ATTN, sdpa_mask)


def attncap_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, scaling: float | None = None,
                              dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: query [B, H, Nq, D], key/value [B, Hk, Nk, D] (H % Hk == 0),
    attention_mask bool (True = attend) or additive, broadcastable to [B, H, Nq, Nk], or None (then
    kwargs["is_causal"] or module.is_causal decides). Returns (attn_output [B, Nq, H, Dv], weights or None)
    like sdpa_attention_forward; calls a capture leaves alone run on the model's configured attention,
    and outside a capture it is sdpa_attention_forward (eager where the call has sinks)."""
    for cap in reversed(_ACTIVE):
        if id(module) in cap.names:
            out = cap.attend(module, query, key, value, attention_mask, scaling, dropout, kwargs)
            if out is not None:
                return out, None
            return cap.original(module, query, key, value, attention_mask, scaling, dropout, kwargs)
    return original_forward(module, "sdpa", query, key, value, attention_mask, scaling, dropout, kwargs)


# ----------------------------------------------------------------------------------- permutations
def _take(x: torch.Tensor, perm: torch.Tensor | None, dim: int) -> torch.Tensor:
    """Rows of x along dim (2 or 3) in the order perm ([n] shared, or [B, n] per batch element)."""
    if perm is None:
        return x
    perm = perm.to(x.device)
    if perm.dim() == 1:
        return x.index_select(dim, perm)
    shape = [perm.shape[0], 1, 1, 1]
    shape[dim] = perm.shape[1]
    return torch.take_along_dim(x, perm.reshape(shape), dim)


def _inverse(perm: torch.Tensor | None) -> torch.Tensor | None:
    return None if perm is None else torch.argsort(perm, dim=-1)


def _permuted_mask(mask, is_causal: bool, nq: int, nk: int, qperm, kperm, device) -> torch.Tensor | None:
    if qperm is None and kperm is None:
        return mask
    if mask is None and is_causal:
        mask = torch.ones(nq, nk, dtype=torch.bool, device=device).tril()[None, None]
    if mask is None:
        return None
    while mask.dim() < 4:
        mask = mask[None]
    batch = max(p.shape[0] if p is not None and p.dim() == 2 else 1 for p in (qperm, kperm))
    if mask.shape[0] != batch:
        mask = mask.expand(batch, *mask.shape[1:])
    mask = mask.expand(*mask.shape[:2], nq, nk)
    return _take(_take(mask, qperm, 2), kperm, 3)


# ----------------------------------------------------------------------------------- the LM sequence
def _configs(model: torch.nn.Module) -> list:
    """Every config of the model: the top one, its sub-configs (recursively), and submodules' configs."""
    from transformers import PretrainedConfig

    found, todo = {}, [model.config] + [getattr(m, "config", None) for m in model.modules()]
    while todo:
        cfg = todo.pop()
        if not isinstance(cfg, PretrainedConfig) or id(cfg) in found:
            continue
        found[id(cfg)] = cfg
        for key in getattr(cfg, "sub_configs", {}) or {}:
            todo.append(getattr(cfg, key, None))
    return list(found.values())


def _token_ids(model: torch.nn.Module, configs: list) -> dict[str, int | None]:
    """The image / video placeholder ids: the top config's, else a sub-config's (Phi-4-multimodal keeps
    image_token_id in its vision_config)."""
    found: dict[str, int | None] = {name: None for name in MEDIA}
    ordered = [model.config] + [c for c in configs if c is not model.config]
    for modality in found:
        for cfg in ordered:
            for attr in (f"{modality}_token_id", f"{modality}_token_index"):
                value = getattr(cfg, attr, None)
                if found[modality] is None and isinstance(value, int) and not isinstance(value, bool):
                    found[modality] = value
    return found


def _feature_rows(out: Any) -> int | None:
    """Media-token rows a get_*_features call produced (its pooler_output), or None if unreadable."""
    pooled = getattr(out, "pooler_output", out[1] if isinstance(out, tuple) and len(out) > 1 else None)
    if isinstance(pooled, torch.Tensor):
        return int(pooled.shape[:-1].numel())
    if isinstance(pooled, (list, tuple)) and all(isinstance(x, torch.Tensor) for x in pooled):
        return sum(int(x.shape[:-1].numel()) for x in pooled)
    return None


DROPOUT_ATTRS = ("attention_dropout", "dropout", "attn_dropout", "dropout_p")


def refuse_unsupported(model: torch.nn.Module, wants_layer) -> None:
    """Refuse, before anything runs, a selected attention module (``wants_layer(name)``: the capture's
    layers=) whose attention attncap cannot reproduce. Unselected modules run on the model's own
    attention and are no concern of the capture.
    - In training mode with a dropout probability (transformers passes it to the attention function
      then): random dropped probabilities, so the maps would be of another attention than the one that ran.
    - Attention sinks (a ``sinks`` parameter) with logit softcapping (``attn_logit_softcapping`` of the
      module or its config): the sink's logit would be capped too, which is not eager's math. A call
      that passes both without the config showing it is refused at that call."""
    for name, m in model.named_modules():
        if "Attention" not in type(m).__name__ or not wants_layer(name):
            continue
        for attr in DROPOUT_ATTRS if m.training else ():
            p = getattr(m, attr, None)
            if isinstance(p, (int, float)) and not isinstance(p, bool) and p > 0:
                raise ValueError(f"attncap.capture: {name} has {attr}={p} and the model is in training mode, so its "
                                 "attention applies dropout, which attncap does not reproduce; call model.eval() "
                                 "first (or set the dropout to 0, or leave this layer out of layers=)")
        cap = getattr(m, "attn_logit_softcapping", None)
        if cap is None:
            cap = getattr(getattr(m, "config", None), "attn_logit_softcapping", None)
        if isinstance(getattr(m, "sinks", None), torch.Tensor) and cap:
            raise ValueError(f"attncap.capture: {name} has attention sinks and logit softcapping "
                             f"(attn_logit_softcapping={cap}); attncap has no exact form of both together, so capture "
                             "would change the model's outputs; leave this layer out of layers=")


class TransformersCapture:
    """attn_implementation switched to "attncap", step / media / tower hooks; restore() undoes all of it."""

    def __init__(self, model: torch.nn.Module, session: CaptureSession, layout: Any = None):
        self.model = model
        self.session = session
        self.layout = check_layout(layout)
        self.names: dict[int, str] = {}
        self.towers: dict[int, Any] = {}
        self._hooks: list[Any] = []
        self._saved: list[tuple[Any, Any]] = []
        self._impl: dict[int, str | None] = {}
        self._wrapped: list[tuple[Any, str, Any]] = []  # (module, method name, its instance attribute before)
        self._fallback: GenericCapture | None = None
        self._seq: TokenSequence | None = None
        self._pending_ids: torch.Tensor | None = None
        self._media: list[tuple[str, dict, int | None]] = []  # (modality, get_*_features inputs, feature rows)
        self._depth = 0
        self._prestepped = False
        self.modality: str | None = None  # the modality being encoded (the towers read it)
        self._cache: dict[tuple[int, int], Any] = {}
        self._masks: dict[tuple, tuple] = {}  # holds the mask and perms too, so their ids stay theirs
        self._warned: set[str] = set()
        self.token_ids: dict[str, int | None] = {}
        self._cross: set[int] = set()  # language-model attention modules whose keys are the vision tokens (Mllama)
        self._tile_tower: TileTower | None = None
        self._perceivers: dict[int, int | None] = {}  # perceiver attention modules -> context tokens of their call
        self._encoded: Any = None  # the vision tower that ran last in the media encoding under way
        self.vision_config = getattr(model.config, "vision_config", None)

    # -------------------------------------------------------------------------- install / restore
    def install(self) -> None:
        check_steps(self.session, "generation")
        configs = _configs(self.model)
        refuse_unsupported(self.model, self.session.config.wants_layer)
        register()
        self.token_ids = _token_ids(self.model, configs)
        try:
            self._saved = [(c, getattr(c, "_attn_implementation_internal", None)) for c in configs]
            self._impl = {id(c): getattr(c, "_attn_implementation", None) for c in configs}
            try:
                self.model.set_attn_implementation(ATTN)
            except (ValueError, ImportError, KeyError, AttributeError):
                pass
            if getattr(self.model.config, "_attn_implementation", None) != ATTN:
                # The model does not dispatch through AttentionInterface: catch its SDPA calls instead.
                self._restore_configs()
                self._fallback = GenericCapture(self.model, self.session, self.layout)
                self._fallback.install()
                return
            self.names = {id(m): name for name, m in self.model.named_modules()}
            self._find_towers()
            self._find_perceivers()
            self._find_cross_attention()
            self._wrap_media()
            self._watch_embedding_modules()
            self._hooks.append(self.model.register_forward_pre_hook(self._on_step, with_kwargs=True))
            self._hooks.append(self.model.register_forward_hook(self._after_step, always_call=True))
            _ACTIVE.append(self)
        except Exception:
            self.restore()
            raise

    def restore(self) -> None:
        if self._fallback is not None:
            self._fallback.restore()
            self._fallback = None
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for owner, name, before in reversed(self._wrapped):
            if before is _UNSET:
                vars(owner).pop(name, None)
            else:
                setattr(owner, name, before)
        self._wrapped.clear()
        self._restore_configs()
        for i in range(len(_ACTIVE) - 1, -1, -1):
            if _ACTIVE[i] is self:
                del _ACTIVE[i]
        self._seq = self._pending_ids = None
        self._media.clear()
        self._cache.clear()
        self._masks.clear()

    def _restore_configs(self) -> None:
        for cfg, value in self._saved:
            cfg._attn_implementation_internal = value
        self._saved = []

    def _find_towers(self) -> None:
        from transformers import PreTrainedModel

        vc = self.vision_config
        roots: list[tuple[str, torch.nn.Module]] = []
        for name, m in self.model.named_modules():
            if not name or any(name.startswith(r + ".") for r, _ in roots):
                continue
            by_config = vc is not None and isinstance(m, PreTrainedModel) and getattr(m, "config", None) is vc
            by_name = vc is not None and name.rsplit(".", 1)[-1] in ("visual", "vision_tower", "vision_model")
            if by_config or by_name or name.rsplit(".", 1)[-1] == "audio_tower":
                roots.append((name, m))
        for name, root in roots:
            if name.rsplit(".", 1)[-1] == "audio_tower":
                audio = AudioTower(root)
                self.towers.update({id(sub): audio for sub in root.modules()})
                continue
            merged = hasattr(root, "spatial_merge_size") or hasattr(root, "merge_kernel_size")
            tiled = getattr(getattr(root, "config", None), "model_type", None) == "mllama_vision_model"
            tower = TileTower(root) if tiled else MergeTower(root) if merged else PatchTower(root)
            if tiled:
                self._tile_tower = tower
            self._hooks.append(root.register_forward_pre_hook(
                lambda mod, args, kwargs, t=tower: self._tower_begins(t, args, kwargs), with_kwargs=True))
            for sub in root.modules():
                self.towers[id(sub)] = tower
                forward = getattr(type(sub), "forward", None)
                if isinstance(tower, MergeTower) and forward is not None and \
                        "cu_seqlens" in inspect.signature(forward).parameters:
                    self._hooks.append(sub.register_forward_pre_hook(
                        lambda mod, args, kwargs, t=tower: t.on_attention_module(mod, args, kwargs), with_kwargs=True))

    def _tower_begins(self, tower, args, kwargs) -> None:
        self._encoded = tower
        tower.begin(self, args, kwargs)

    def _find_perceivers(self) -> None:
        """Perceiver resamplers (Idefics2): attention modules whose forward takes the latents and the
        context they resample; a pre-hook notes the context's length for the call's layout."""
        for m in self.model.modules():
            forward = getattr(type(m), "forward", None)
            if id(m) in self.towers or forward is None or \
                    not {"latents", "context"} <= set(inspect.signature(forward).parameters):
                continue
            signature = inspect.signature(forward)
            self._perceivers[id(m)] = None

            def before(mod, args, kwargs, signature=signature):
                try:
                    context = signature.bind_partial(mod, *args, **kwargs).arguments.get("context")
                except TypeError:
                    context = None
                self._perceivers[id(mod)] = context.shape[1] if isinstance(context, torch.Tensor) else None

            self._hooks.append(m.register_forward_pre_hook(before, with_kwargs=True))

    def _find_cross_attention(self) -> None:
        """Mllama's cross-attention layers (their forward takes cross_attention_states) attend from the
        text to the tiles of its vision tower; its <|image|> token is then an ordinary text token (the
        image never replaces it), so the self-attention layers see text only."""
        if self._tile_tower is None:
            return
        for m in self.model.modules():
            forward = getattr(type(m), "forward", None)
            if id(m) not in self.towers and forward is not None and \
                    "cross_attention_states" in inspect.signature(forward).parameters:
                self._cross.add(id(m))
        if self._cross:
            self.token_ids = {name: None for name in self.token_ids}

    def _wrap_media(self) -> None:
        """Watch get_image_features / get_video_features of the base model: generate() calls them before
        the first forward (the pixel inputs never reach the forward), a plain forward from inside it."""
        base = getattr(self.model, "base_model", self.model)
        for modality in MEDIA:
            name = f"get_{modality}_features"
            fn = getattr(base, name, None)
            if not callable(fn):
                continue
            try:
                signature = inspect.signature(fn)
            except (TypeError, ValueError):
                continue
            self._wrapped.append((base, name, vars(base).get(name, _UNSET)))
            setattr(base, name, self._media_wrapper(fn, signature, modality))

    def _watch_embedding_modules(self) -> None:
        """Phi-4-multimodal has no get_image_features: its image embedding module (the one taking
        image_pixel_values) encodes the images inside the forward; its inputs are watched instead."""
        for m in self.model.modules():
            forward = getattr(type(m), "forward", None)
            if forward is None or "image_pixel_values" not in inspect.signature(forward).parameters or \
                    "audio_input_features" in inspect.signature(forward).parameters:  # the image embedding itself
                continue
            signature = inspect.signature(forward)

            def before(mod, args, kwargs, signature=signature):
                try:
                    bound = signature.bind_partial(mod, *args, **kwargs).arguments
                except TypeError:
                    bound = dict(kwargs)
                self.modality, self._encoded = "image", None
                self._media.append(("image", {k: v for k, v in bound.items() if k != "self"}, None))

            def after(mod, args, kwargs, out):
                self.modality = None

            self._hooks.append(m.register_forward_pre_hook(before, with_kwargs=True))
            self._hooks.append(m.register_forward_hook(after, with_kwargs=True, always_call=True))

    def _media_wrapper(self, fn, signature: inspect.Signature, modality: str):
        @functools.wraps(fn)  # generate() reads the signature to pick the method's inputs
        def encode(*args, **kwargs):
            if self.modality is not None:  # called from another get_*_features (Qwen3-VL videos): theirs
                return fn(*args, **kwargs)
            try:
                bound = signature.bind_partial(*args, **kwargs).arguments
            except TypeError:
                bound = dict(kwargs)
            inputs = {k: v for k, v in bound.items() if k != "kwargs"}
            inputs.update(bound.get("kwargs") or {})
            if self._depth == 0 and not self._prestepped:
                # generate() encodes the media before the prefill: the towers belong to the prefill's step.
                self._begin_step()
                self._prestepped = True
                self._media = []
            self.modality, self._encoded = modality, None
            try:
                out = fn(*args, **kwargs)
            finally:
                self.modality = None
            self._media.append((modality, inputs, _feature_rows(out)))
            return out
        return encode

    # -------------------------------------------------------------------------- steps
    def _begin_step(self) -> None:
        st = self.session.state
        st.advance(None)
        st.active = self.session.config.wants_step(st.step, None)
        self._cache.clear()
        self._masks.clear()

    def _after_step(self, model, args, output) -> None:
        self._depth -= 1

    def _on_step(self, model, args, kwargs) -> None:
        self._depth += 1
        if self._prestepped:  # the media were encoded for this step already (generate's prefill)
            self._prestepped = False
        else:
            self._begin_step()
            if kwargs.get("mm_encoder_outputs") is None:
                self._media = []
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        seen = None
        if cache is not None:
            try:
                seen = int(cache.get_seq_length())
            except Exception:
                seen = None
        self._pending_ids = None
        if self._tile_tower is not None and (cache is None or seen == 0):  # the images are encoded anew (or none)
            self._tile_tower.cross_keys = None
        fresh = cache is None or seen == 0 or self._seq is None
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            self._seq = None
        elif fresh:  # placed at the first language-model call, once this forward has encoded its media
            self._seq, self._pending_ids = None, ids
        elif self._seq.segid.shape[0] == ids.shape[0] and seen == self._seq.length:
            self._seq.extend(ids.shape[1])
        else:
            self._seq = None
        return None

    def _sequence(self) -> TokenSequence | None:
        ids = self._pending_ids
        if ids is None:
            return self._seq
        self._pending_ids = None
        items: dict[str, list] = {}
        notes = []
        base = getattr(self.model, "base_model", self.model)
        kind = getattr(self.model.config, "model_type", "?")
        token_ids = self.token_ids
        seen = {m for m, _, _ in self._media}
        if kind in VIDEO_IN_IMAGE_TOKENS and seen & set(MEDIA) == {"video"}:
            # GLM-4V writes a video's frames with the image token (its forward takes images or a video)
            token_ids = dict(token_ids, image=None, video=token_ids.get("image"))
        for modality in MEDIA:
            token = token_ids.get(modality)
            if token is None or modality == "audio" or not bool((ids == token).any()):
                continue  # audio: one grid-less segment per run of its tokens, no rule needed
            calls = [(inputs, rows) for m, inputs, rows in self._media if m == modality]
            found = []
            for inputs, rows in calls:  # one encoding of the prompt's images: their tiles' structure is in ids
                got = media_items(base, base.config, inputs, modality, ids if len(calls) == 1 else None)
                if got is None:
                    found = None
                    notes.append(f"attncap knows no {modality} token layout for model_type {kind!r}")
                    break
                claimed = sum(item.media_count for item in got)
                if rows is not None and claimed != rows:
                    found = None
                    notes.append(f"its {modality} layout rule gives {claimed} tokens, the model made {rows}")
                    break
                found.extend(got)
                notes += sorted({f"its {modality} tokens have no grid: {p.no_grid}" for item in got for p in item.pieces
                                 if p.no_grid is not None})
                for why in sorted({p.no_layout for item in got for p in item.pieces if p.no_layout is not None}):
                    self._warn(f"tiles:{why}", f"attncap: {kind}: the tile arrangement of its images (rows x cols of "
                                               f"tiles, global view) is not recorded: {why}; each tile keeps its grid")
            if not calls:
                notes.append(f"no {modality} inputs were seen (get_{modality}_features was not called)")
            items[modality] = found or None
        self._seq, problems = TokenSequence.start(ids, token_ids, items)
        for why in notes + problems:
            self._warn(f"layout:{why}", f"attncap: {kind}: {why}; those media tokens are captured as segments "
                                        "without a grid")
        return self._seq

    # -------------------------------------------------------------------------- one attention call
    def attend(self, module, query, key, value, mask, scaling, dropout, kwargs) -> torch.Tensor | None:
        """The call through attncap, or None to leave it to the model's own attention."""
        st = self.session.state
        layer = self.names[id(module)]
        tower = self.towers.get(id(module))
        tower_layout = None
        if tower is not None:
            # Keep the per-call counter of the tower in step even when this call is not captured.
            tower_layout = tower.layout(module, query, key) if self.layout is None else None
        if not st.active or not self.session.config.wants_layer(layer):
            return None
        unsupported = ("dropout" if dropout else "a position bias" if kwargs.get("position_bias") is not None
                       else "a flex BlockMask" if mask is not None and not isinstance(mask, torch.Tensor) else None)
        if unsupported is not None:
            self._warn(f"skip:{unsupported}", f"attncap: {layer} (and any layer like it) is not captured: its "
                                             f"attention uses {unsupported}, which attncap does not reproduce")
            return None
        if query.dim() != 4 or key.dim() != 4 or query.shape[1] % key.shape[1]:
            return None
        scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        is_causal = kwargs.get("is_causal")
        if is_causal is None:
            is_causal = getattr(module, "is_causal", True)
        nq = query.shape[2]
        is_causal = bool(nq > 1 and mask is None and is_causal)
        if is_causal and key.shape[2] > nq:  # as sdpa_attention_forward: an empty static cache at prefill
            key, value = key[:, :, :nq], value[:, :, :nq]
        nk = key.shape[2]
        qperm = kperm = None
        if self.layout is not None:
            layout = layout_for(self.layout, layer, query, key)
            defaults = all_relations(layout) if layout is not None else ()
        elif tower is not None:
            if tower_layout is None:
                return None
            layout, qperm = tower_layout
            kperm = qperm
            defaults = TOWER_DEFAULT
        elif id(module) in self._cross:
            layout, defaults = self._cross_layout(nq, nk), ("text->image",)
        elif id(module) in self._perceivers:
            layout, problem = perceiver_layout(self._perceivers[id(module)], nq, nk, self._encoded)
            defaults = ("latents->image",)
            if problem is not None:
                self._warn(f"perceiver:{problem}", f"attncap: {layer}: {problem}")
        else:
            found = self._lm_layout(nq, nk)
            if found is None:
                return None
            layout, qperm, kperm, defaults = found
        if layout is None:
            return None
        q, k, v = _take(query, qperm, 2), _take(key, kperm, 2), _take(value, kperm, 2)
        if qperm is None and kperm is None:
            attn_mask = mask
        else:  # every layer of a step shares the mask and the permutation: permute the mask once
            key_ = (id(mask), is_causal, nq, nk, id(qperm), id(kperm))
            if key_ not in self._masks:
                self._masks[key_] = (mask, qperm, kperm,
                                     _permuted_mask(mask, is_causal, nq, nk, qperm, kperm, query.device))
            attn_mask = self._masks[key_][3]
            is_causal = False  # now in the mask
        sinks, softcap = sinks_of(kwargs), kwargs.get("softcap")
        if sinks is not None and softcap is not None:  # the sink's logit would be capped too: not eager's math
            raise ValueError(f"{layer}: attention sinks together with logit softcapping (softcap={softcap}) have "
                             "no exact form in attncap; capture would change the model's outputs")
        if sinks is not None:  # one more key, the sink: exact (attncap.integrations.hf_attention)
            q, k, v, attn_mask = with_sink(q, k, v, attn_mask, is_causal, sinks, scale)
            is_causal = False
            layout = CallLayout(layout.queries, layout.keys + (Segment("sink", nk, nk + 1),))
        if qperm is not None or kperm is not None:  # relations="full" records are put back in sequence order
            korder = kperm if kperm is None or sinks is None else \
                torch.cat([kperm, torch.full_like(kperm[..., :1], nk)], -1)  # the sink key stays last
            layout = dataclasses.replace(layout, query_order=qperm, key_order=korder)
        out = self.session.capture_call(layer, layout, defaults, q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                        scale=scale, softcap=softcap)
        if out is None:
            return None
        out = _take(out, _inverse(qperm), 2)
        return out.transpose(1, 2).contiguous()

    def original(self, module, query, key, value, mask, scaling, dropout, kwargs):
        """The attention the model was configured with (attncap.integrations.hf_attention.original_forward)."""
        cfg = getattr(module, "config", None)
        impl = self._impl.get(id(cfg), self._impl.get(id(self.model.config)))
        return original_forward(module, impl, query, key, value, mask, scaling, dropout, kwargs)

    def _cross_layout(self, nq: int, nk: int) -> CallLayout:
        """Text queries over the tiles of every image (TileTower.cross_keys), or one grid-less "image"
        key segment when the tower did not run for these keys (cross_attention_states passed in)."""
        keys = self._tile_tower.cross_keys if self._tile_tower is not None else None
        if keys is None or keys[-1].stop != nk:
            self._warn("cross", "attncap: the cross-attention keys do not match the vision tower's tiles "
                                "(cross_attention_states passed in?); they are captured as one image segment without a grid")
            keys = (Segment("image", 0, nk),)
        return CallLayout((Segment("text", 0, nq),), keys)

    def _lm_layout(self, nq: int, nk: int):
        if self.modality is not None:  # a connector inside get_*_features (Idefics2's perceiver), not the LM
            return CallLayout((Segment("tokens", 0, nq),), (Segment("tokens", 0, nk),)), None, None, ()
        if (nq, nk) in self._cache:
            return self._cache[(nq, nk)]
        seq = self._sequence()
        text_only = seq is not None and not bool(seq.segid.any())
        if seq is None or text_only or seq.length != nk or nq > nk:
            name = "text" if text_only or all(v is None for v in self.token_ids.values()) else "tokens"
            found = (CallLayout((Segment(name, 0, nq),), (Segment(name, 0, nk),)), None, None,
                     LM_DEFAULT_TEXT if name == "text" else ())
        else:
            keys = seq.axis(0, nk)
            queries = seq.axis(nk - nq, nk)
            if keys is None or queries is None:
                self._warn("media", "attncap: the batch elements have different numbers of text/image tokens; "
                                    "their language-model attention is not captured (capture one prompt at a time)")
                found = None
            else:
                media = any(s.name in MEDIA for s in keys[0])
                found = (CallLayout(queries[0], keys[0]), queries[1], keys[1],
                         LM_DEFAULT_MEDIA if media else LM_DEFAULT_TEXT)
        self._cache[(nq, nk)] = found
        return found

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)
