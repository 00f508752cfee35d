"""Pictures of captured attention: heatmaps, overlays, grids, montages, animations.

    from attncap import viz
    viz.token_heatmaps(store, image=image, path="tokens.png")     # a tile per prompt word (+ overlays)
    viz.montage(store, "cat", path="montage.png")                  # layers x steps
    viz.self_attention(store, [(0.5, 0.5)], image=image, path="self.png")
    viz.evolution_animation(store, ["evolution.gif", "evolution.mp4"], image=image)
    viz.generation_view(store, "generation.mp4", tokens=generated, image=image)   # language models
    viz.explore(store, "explorer.html", image=image)               # the interactive offline page

core holds the pixel tools (colour maps, overlay, labelled grids), figures the still pictures,
animate the GIF/MP4 writers, explorer the HTML page. matplotlib is used through its Agg canvas only; no GUI backend is set.
"""
from .animate import (evolution_animation, evolution_frames, ffmpeg_available, generation_frames, generation_maps,
                      generation_view, video_overlay, video_word_animation, write_animation)
from . import explorer
from .core import as_frames, as_rgb, colorize, grid, heat_tile, overlay, save_png, short_layer, strip
from .figures import (groups_view, head_grid, masks_view, montage, record_map, resolve_words, self_attention, stats_chart,
                      token_heatmaps, word_overlay)
from .explorer import explore

__all__ = ["as_frames", "as_rgb", "colorize", "evolution_animation", "explore", "explorer", "evolution_frames", "ffmpeg_available",
           "generation_frames", "generation_maps", "generation_view", "grid", "groups_view", "head_grid",
           "heat_tile", "masks_view", "montage", "overlay", "record_map", "resolve_words", "save_png", "self_attention",
           "short_layer", "stats_chart", "strip", "token_heatmaps", "video_overlay", "video_word_animation",
           "word_overlay", "write_animation"]
