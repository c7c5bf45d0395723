// PNG output through libpng (Debian: libpng-dev). libpng reports errors by longjmp, which Swift
// cannot cross, so the setjmp lives here and callers get a return code.
#ifndef VIST2_CIMAGEIO_H
#define VIST2_CIMAGEIO_H
#include <stddef.h>
#include <stdint.h>

/// Writes an 8-bit grayscale image (row-major, `width` bytes per row) as PNG to `path`.
/// Returns 0 on success, -1 if the file cannot be opened, -2 on a libpng error.
int vk_png_write_gray8(const char *path, const uint8_t *pixels, int width, int height);

/// Encodes the same as PNG bytes in memory: *out (free with free()) and *out_len.
/// Returns 0 on success, -1 when out of memory, -2 on a libpng error.
int vk_png_encode_gray8(const uint8_t *pixels, int width, int height, uint8_t **out, size_t *out_len);

/// Decodes PNG bytes (any colour type, converted to 8-bit gray by libpng) into *pixels (free with
/// free()), *width and *height. Images of more than `max_pixels` pixels are refused before any
/// pixel is decoded. Returns 0 on success, -1 when out of memory, -2 when the bytes are not a
/// PNG libpng can read, -3 when the image is empty or too large.
int vk_png_decode_gray8(const uint8_t *data, size_t len, size_t max_pixels, uint8_t **pixels, int *width, int *height);

#endif
