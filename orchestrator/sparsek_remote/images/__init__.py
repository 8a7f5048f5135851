"""The image: its content-addressed build, its layers, and the partial archive that
ships only what a host lacks. The only package that talks to Docker."""

from sparsek_remote.images._stream import ChunkReader
from sparsek_remote.images.archive import (
    CODECS,
    LOAD_ARGV,
    ArchiveStats,
    Codec,
    PartialArchive,
)
from sparsek_remote.images.build import (
    BuiltImage,
    ImageInfo,
    build_image,
    docker_client,
    image_info,
)
from sparsek_remote.images.context import (
    HASH_LABEL,
    IMAGE_REPOSITORY,
    BuildContext,
    BuildOptions,
    collect_context,
    write_context_tar,
)
from sparsek_remote.images.layers import (
    DOCKER_UNUSABLE_EXIT,
    HOST_QUERY_SCRIPT,
    ArchiveLayout,
    HostImages,
    archive_layout,
    chain_ids,
    image_id_argv,
    legacy_layer_folders,
    parse_host_query,
    scan_layout,
)

__all__ = [
    "ArchiveLayout",
    "ArchiveStats",
    "BuildContext",
    "BuildOptions",
    "BuiltImage",
    "CODECS",
    "ChunkReader",
    "Codec",
    "DOCKER_UNUSABLE_EXIT",
    "HASH_LABEL",
    "HOST_QUERY_SCRIPT",
    "HostImages",
    "IMAGE_REPOSITORY",
    "ImageInfo",
    "LOAD_ARGV",
    "PartialArchive",
    "archive_layout",
    "build_image",
    "chain_ids",
    "collect_context",
    "docker_client",
    "image_id_argv",
    "image_info",
    "legacy_layer_folders",
    "parse_host_query",
    "scan_layout",
    "write_context_tar",
]
