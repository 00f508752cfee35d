"""transformers integration: an "attncap" attention function over the one shared capture path.

``register()`` adds "attncap" to transformers' AttentionInterface (and sdpa's mask builder under the same
name to AttentionMaskInterface, so padding/causal masks arrive as bool [B, 1, Nq, Nk] masks or None).
``attncap.capture(model)`` switches every config of the model to attn_implementation="attncap" for the
block (restored on exit) and routes each attention call to the session; calls that are not captured
(steps or layers not asked for, dropout, softcap, sinks, position bias, flex block masks) go through
transformers' own sdpa_attention_forward unchanged.

Layers are module paths: "model.language_model.layers.0.self_attn", "model.visual.blocks.0.attn",
"model.vision_tower.encoder.layers.0.self_attn", "encoder.layer.0.attention.self".
Each call of the model's forward is one step: a plain forward is step 0 (then 1, ...); in generate()
the prefill is step 0 and every generated token one more step (Nq = 1 with the KV cache).

Token layouts (segments of a call, see attncap.session):
  language model   "text" (every non-media token, prompt and generated, in sequence order) and one
                   segment per image ("image") or video ("video") found from config.image_token_id /
                   video_token_id in input_ids. Media tokens carry the image's grid: Qwen2-VL/2.5-VL
                   (h/merge, w/merge) from image_grid_thw ((t, h/m, w/m) for videos), LLaVA-style
                   (H/patch, W/patch) from pixel_values ("default" feature strategy). Text and media are
                   gathered into contiguous segments per batch element (a permutation of q/k/v rows and
                   of the mask, undone on the output), so "text->image" maps hold every text token.
                   auto relations: text->image / text->video, or text->text for a text-only model.
  Qwen2-VL towers  one attention call per image frame: "image->image" ("video->video") on the frame's
                   (h, w) patch grid, rows reordered from the merge-block order the tower uses to
                   row-major. Qwen2.5-VL: the full-attention blocks (fullatt_block_indexes) are captured
                   the same way; its window-attention blocks call attention once per window and are NOT
                   captured (they run on SDPA unchanged).
  CLIP/SigLIP      "image" on the (H/patch, W/patch) grid, with a leading "cls" segment when the tower
  towers (LLaVA)   has a class token; auto relation image->image.
  layout=          a user layout (attncap.integrations.generic) replaces all of the above.

Limits: every batch element must have the same media structure (number of tokens per segment) for a
call to be captured (otherwise the call runs on SDPA and a warning says so); caches whose key length is
not the sequence length (static or sliding-window caches) give a single "tokens" key segment on VLMs.
The permuted path materialises a bool mask [B, 1, Nq, Nk] for causal prefill of a VLM prompt.
"""
from __future__ import annotations

import inspect
import sys
import warnings
from typing import Any

import torch

from ..session import CallLayout, CaptureSession, Segment
from .generic import GenericCapture, all_relations, check_layout, check_steps, layout_for
from .vlm_layouts import MEDIA, MergeTower, PatchTower, TokenSequence

ATTN = "attncap"
LM_DEFAULT_MEDIA = ("text->image", "text->video")
LM_DEFAULT_TEXT = ("text->text",)
TOWER_DEFAULT = ("image->image", "video->video")
UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias")

_ACTIVE: list["TransformersCapture"] = []


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


def _sdpa(module, query, key, value, attention_mask, scaling, dropout, kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def attncap_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, scaling: float | None = None,
                              dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: query [B, H, Nq, D], key/value [B, Hk, Nk, D] (H % Hk == 0),
    attention_mask bool (True = attend) or additive, broadcastable to [B, H, Nq, Nk], or None (then
    kwargs["is_causal"] or module.is_causal decides). Returns (attn_output [B, Nq, H, Dv], None) like
    sdpa_attention_forward; outside a capture it is sdpa_attention_forward."""
    for cap in reversed(_ACTIVE):
        if id(module) in cap.names:
            out = cap.attend(module, query, key, value, attention_mask, scaling, dropout, kwargs)
            if out is not None:
                return out, None
            break
    return _sdpa(module, query, key, value, attention_mask, scaling, dropout, kwargs)


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
        self._fallback: GenericCapture | None = None
        self._seq: TokenSequence | None = None
        self._grids: list[tuple[str, torch.Tensor]] = []
        self._cache: dict[tuple[int, int], Any] = {}
        self._masks: dict[tuple, tuple] = {}  # holds the mask and perms too, so their ids stay theirs
        self._warned: set[str] = set()
        cfg = model.config
        self.token_ids = {"image": getattr(cfg, "image_token_id", None), "video": getattr(cfg, "video_token_id", None)}
        self.vision_config = getattr(cfg, "vision_config", None)

    # -------------------------------------------------------------------------- install / restore
    def install(self) -> None:
        check_steps(self.session, "generation")
        register()
        try:
            self._saved = [(c, getattr(c, "_attn_implementation_internal", None)) for c in _configs(self.model)]
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
            self._hooks.append(self.model.register_forward_pre_hook(self._on_step, with_kwargs=True))
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
        self._restore_configs()
        for i in range(len(_ACTIVE) - 1, -1, -1):
            if _ACTIVE[i] is self:
                del _ACTIVE[i]
        self._seq = None
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
            if by_config or by_name:
                roots.append((name, m))
        for name, root in roots:
            tower = MergeTower(root) if hasattr(root, "spatial_merge_size") else PatchTower(root)
            self._hooks.append(root.register_forward_pre_hook(
                lambda mod, args, kwargs, t=tower: t.begin(self, args, kwargs), with_kwargs=True))
            for sub in root.modules():
                self.towers[id(sub)] = tower
                forward = getattr(type(sub), "forward", None)
                if isinstance(tower, MergeTower) and forward is not None and \
                        "cu_seqlens" in inspect.signature(forward).parameters:
                    self._hooks.append(sub.register_forward_pre_hook(
                        lambda mod, args, kwargs, t=tower: t.on_attention_module(mod, args, kwargs), with_kwargs=True))

    # -------------------------------------------------------------------------- steps
    def _on_step(self, model, args, kwargs) -> None:
        st = self.session.state
        st.advance(None)
        st.active = self.session.config.wants_step(st.step, None)
        self._cache.clear()
        self._masks.clear()
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        seen = None
        if cache is not None:
            try:
                seen = int(cache.get_seq_length())
            except Exception:
                seen = None
        fresh = cache is None or seen == 0 or self._seq is None
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            self._seq = None
        elif fresh:
            self._grids = [(name, kwargs[key]) for name, key in (("image", "image_grid_thw"),
                                                                 ("video", "video_grid_thw"))
                           if isinstance(kwargs.get(key), torch.Tensor)]
            self._seq = TokenSequence.start(ids, self.token_ids, self._media_specs(kwargs))
        elif self._seq.segid.shape[0] == ids.shape[0] and seen == self._seq.length:
            self._seq.extend(ids.shape[1])
        else:
            self._seq = None
        return None

    def _media_specs(self, kwargs) -> dict[str, list[tuple[int, tuple[int, ...] | None]]]:
        """(token count, grid) of every image / video of the batch, in order, from the forward's inputs."""
        specs: dict[str, list] = {"image": [], "video": []}
        vc = self.vision_config
        merge = getattr(vc, "spatial_merge_size", None)
        for name, key in (("image", "image_grid_thw"), ("video", "video_grid_thw")):
            g = kwargs.get(key)
            if isinstance(g, torch.Tensor) and merge:
                for t, h, w in g.tolist():
                    grid = (h // merge, w // merge) if (t == 1 and name == "image") else (t, h // merge, w // merge)
                    specs[name].append((t * (h // merge) * (w // merge), grid))
        pv = kwargs.get("pixel_values")
        patch = getattr(vc, "patch_size", None)
        if not specs["image"] and isinstance(pv, torch.Tensor) and pv.dim() == 4 and isinstance(patch, int):
            gh, gw = pv.shape[-2] // patch, pv.shape[-1] // patch
            strategy = kwargs.get("vision_feature_select_strategy") or \
                getattr(self.model.config, "vision_feature_select_strategy", "default")
            spec = (gh * gw, (gh, gw)) if strategy == "default" else (gh * gw + 1, None)
            specs["image"] = [spec] * pv.shape[0]
        return specs

    def modality_of(self, grid_thw: torch.Tensor) -> str:
        for i, (name, g) in enumerate(self._grids):
            if g.shape == grid_thw.shape and bool((g.to(grid_thw.device) == grid_thw).all()):
                del self._grids[i]
                return name
        return "image"

    # -------------------------------------------------------------------------- one attention call
    def attend(self, module, query, key, value, mask, scaling, dropout, kwargs) -> torch.Tensor | None:
        st = self.session.state
        layer = self.names[id(module)]
        tower = self.towers.get(id(module))
        tower_layout = None
        if tower is not None:
            # Keep the per-call counter of the tower in step even when this call is not captured.
            tower_layout = tower.layout(module, query, key) if self.layout is None else None
        if not st.active or dropout or not self.session.config.wants_layer(layer):
            return None
        if any(kwargs.get(k) is not None for k in UNSUPPORTED_KWARGS):
            return None
        if mask is not None and not isinstance(mask, torch.Tensor):
            return None  # e.g. a flex BlockMask
        if query.dim() != 4 or key.dim() != 4 or query.shape[1] % key.shape[1]:
            return None
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
        if qperm is not None or kperm is not None:
            is_causal = False  # now in the mask
        out = self.session.capture_call(layer, layout, defaults, q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                        scale=scaling)
        if out is None:
            return None
        out = _take(out, _inverse(qperm), 2)
        return out.transpose(1, 2).contiguous()

    def _lm_layout(self, nq: int, nk: int):
        if (nq, nk) in self._cache:
            return self._cache[(nq, nk)]
        seq = self._seq
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
