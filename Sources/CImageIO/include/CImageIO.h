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

#endif
