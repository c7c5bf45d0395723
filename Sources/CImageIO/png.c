#include "CImageIO.h"

#include <png.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct vk_membuf {
    uint8_t *data;
    size_t len, cap;
    int failed;
};

static void vk_mem_write(png_structp png, png_bytep bytes, png_size_t n) {
    struct vk_membuf *b = (struct vk_membuf *)png_get_io_ptr(png);
    if (b->failed) return;
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n) cap *= 2;
        uint8_t *p = realloc(b->data, cap);
        if (!p) {
            b->failed = 1;
            return;
        }
        b->data = p;
        b->cap = cap;
    }
    memcpy(b->data + b->len, bytes, n);
    b->len += n;
}

static void vk_mem_flush(png_structp png) { (void)png; }

int vk_png_encode_gray8(const uint8_t *pixels, int width, int height, uint8_t **out, size_t *out_len) {
    struct vk_membuf b = {0};
    *out = NULL;
    *out_len = 0;
    png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, NULL, NULL, NULL);
    png_infop info = png ? png_create_info_struct(png) : NULL;
    if (!png || !info) {
        png_destroy_write_struct(&png, &info);
        return -2;
    }
    if (setjmp(png_jmpbuf(png))) {
        png_destroy_write_struct(&png, &info);
        free(b.data);
        return -2;
    }
    png_set_write_fn(png, &b, vk_mem_write, vk_mem_flush);
    png_set_IHDR(png, info, (png_uint_32)width, (png_uint_32)height, 8, PNG_COLOR_TYPE_GRAY, PNG_INTERLACE_NONE,
                 PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
    png_write_info(png, info);
    for (int y = 0; y < height; y++) png_write_row(png, (png_const_bytep)(pixels + (size_t)y * (size_t)width));
    png_write_end(png, NULL);
    png_destroy_write_struct(&png, &info);
    if (b.failed) {
        free(b.data);
        return -1;
    }
    *out = b.data;
    *out_len = b.len;
    return 0;
}

int vk_png_write_gray8(const char *path, const uint8_t *pixels, int width, int height) {
    uint8_t *bytes = NULL;
    size_t len = 0;
    int rc = vk_png_encode_gray8(pixels, width, height, &bytes, &len);
    if (rc != 0) return -2;
    FILE *f = fopen(path, "wb");
    if (!f) {
        free(bytes);
        return -1;
    }
    size_t wrote = fwrite(bytes, 1, len, f);
    free(bytes);
    int closed = fclose(f);
    return wrote == len && closed == 0 ? 0 : -1;
}

int vk_png_decode_gray8(const uint8_t *data, size_t len, size_t max_pixels, uint8_t **pixels, int *width, int *height) {
    *pixels = NULL;
    *width = 0;
    *height = 0;
    png_image image;
    memset(&image, 0, sizeof image);
    image.version = PNG_IMAGE_VERSION;
    if (!png_image_begin_read_from_memory(&image, data, len)) return -2;
    if (image.width == 0 || image.height == 0 || image.width > 65535 || image.height > 65535 ||
        (size_t)image.width * (size_t)image.height > max_pixels) {
        png_image_free(&image);
        return -3;
    }
    image.format = PNG_FORMAT_GRAY;
    uint8_t *buffer = malloc(PNG_IMAGE_SIZE(image));
    if (!buffer) {
        png_image_free(&image);
        return -1;
    }
    if (!png_image_finish_read(&image, NULL, buffer, 0, NULL)) {
        free(buffer);
        png_image_free(&image);
        return -2;
    }
    *pixels = buffer;
    *width = (int)image.width;
    *height = (int)image.height;
    return 0;
}
