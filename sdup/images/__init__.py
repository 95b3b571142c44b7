"""Image files: reading inputs, writing outputs with their parameters and ICC profile, tensors <-> pixels.

    img = read_image(path)      # .rgb (3, H, W) in [0, 1], .alpha (1, H, W) or None, .bits 8 | 16, .icc_profile
    write_image(path, rgb, alpha, bits=img.bits, parameters={...}, icc_profile=img.icc_profile)   # atomic
    read_parameters(path)       # the JSON back, from any output format

Modules, one concern each:
    read       inputs: size check from the header, EXIF orientation, 16-bit kept, one-line errors
    write      outputs: the formats, encoded in memory and written atomically; ``save_png`` for txt2img
    metadata   where the parameters, the ICC profile and the orientation live in each format
    pngfile    16-bit PNG through pypng (Pillow reads 16-bit colour at 8 bits and cannot write it)
    tiff       16-bit TIFF through tifffile (the same gap in Pillow)
    convert    tensors <-> uint8 / uint16 arrays <-> PIL images; orientation; the alpha resize
    paths      output names for generated images
    errors     ``UpscaleIOError`` (one line for the user), ``ImageWriteError``, ``note``
"""
from .convert import from_uint16, orient, pil_to_tensor, tensor_to_pil, to_uint, upscale_alpha
from .errors import DECODE_ERRORS, ImageWriteError, UpscaleIOError, decoding, first_line, note, one_line
from .metadata import (EXIF_IMAGE_DESCRIPTION, EXIF_ORIENTATION, exif_orientation, read_parameters,
                       read_png_parameters, rgb_icc_profile)
from .paths import output_paths
from .pngfile import PARAMETERS_KEY, encode_png
from .read import MAX_PIXELS, InputImage, check_pixels, image_size, load_image, open_image, read_image
from .tiff import encode_tiff16, read_tiff16
from .write import (EXT_FORMAT, FORMAT_EXT, FORMATS, IMAGE_EXTENSIONS, JPEG_QUALITY, can_write, output_format,
                    save_png, write_bytes, write_image)

__all__ = ["DECODE_ERRORS", "EXIF_IMAGE_DESCRIPTION", "EXIF_ORIENTATION", "EXT_FORMAT", "FORMATS", "FORMAT_EXT",
           "IMAGE_EXTENSIONS", "ImageWriteError", "InputImage", "JPEG_QUALITY", "MAX_PIXELS", "PARAMETERS_KEY",
           "UpscaleIOError", "can_write", "check_pixels", "decoding", "encode_png", "encode_tiff16", "exif_orientation",
           "first_line", "from_uint16", "image_size", "load_image", "note", "open_image", "one_line", "orient", "output_format",
           "output_paths", "pil_to_tensor", "read_image", "read_parameters", "read_png_parameters", "read_tiff16",
           "rgb_icc_profile", "save_png", "tensor_to_pil", "to_uint", "upscale_alpha", "write_bytes", "write_image"]
