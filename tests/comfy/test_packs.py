"""The third-party packs of the test ComfyUI (checkouts in TANDEM_TEST_PACKS, linked into the test base by
conftest.prepare_base): each imports in this host and lists its nodes.

TeaCache and MagCache at their current main branches import comfy.ldm.lightricks.model.precompute_freqs_cis,
which ComfyUI turned into a method of LTXBaseModel (_precompute_freqs_cis) before v0.8.0 (their issues #178 and
#43, open), so as published neither imports in any host version we test. The test base gives ComfyUI a stand-in
for that name before their __init__ runs (conftest.NEEDS_STAND_IN), as their users patch the line; this test
checks that they then import.
"""

from __future__ import annotations

import pytest

PACK_NODES = {"ComfyUI-GGUF": "UnetLoaderGGUF", "ComfyUI-TeaCache": "TeaCache", "ComfyUI-MagCache": "MagCache",
              "Comfy-WaveSpeed": "ApplyFBCacheOnModel"}


@pytest.mark.parametrize("name", list(PACK_NODES))
def test_pack_imports_and_lists_its_nodes(comfy_server, comfy, need_pack, name):
    need_pack(name)
    if PACK_NODES[name] not in comfy_server.get("/object_info"):
        pytest.fail(f"{name} is linked into custom_nodes/ but /object_info has no {PACK_NODES[name]}: "
                    f"{comfy.pack_import_error(comfy_server, name) or 'ComfyUI logged no import error for it'}")
