// FreeType 2 (Debian: libfreetype-dev), found through pkg-config freetype2.
#include <ft2build.h>
#include FT_FREETYPE_H
