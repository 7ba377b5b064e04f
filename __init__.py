"""comfyui-facechain: FaceChain's personal-portrait pipeline as ComfyUI nodes."""

NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}
# The editor extension (the "upload photos" button of Load Face Photos); the host serves this folder's .js files.
WEB_DIRECTORY = "./web"

# pytest imports this file too (its package set-up), where there is nothing to register: as a lone file in
# a checkout whose name is no Python identifier (comfyui-facechain), or as a package without ComfyUI.
if __package__:
    try:
        from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811
    except ModuleNotFoundError as e:
        if e.name not in ("comfy", "folder_paths"):
            raise

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
