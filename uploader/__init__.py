"""nix-cache-uploader: sign and push Nix store paths to a binary cache."""

__version__ = "0.1.0"

__all__ = ["__version__"]
