/* Stand-in for the macOS SDK's header for type-checking ring on Linux (see
 * TargetConditionals.h): kt only `cargo check`s macOS, nothing built here runs. */
#pragma once
#define assert(e) ((void)0)
#define static_assert _Static_assert
