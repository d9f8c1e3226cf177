/* The headers of Apple's SDK that ring's C code includes (this one and its neighbours), for `cargo check` of kt-cli
 * for macOS targets on Linux (.ci/check-targets): type checking only, nothing is linked. */
#pragma once
#define TARGET_OS_MAC 1
#define TARGET_OS_OSX 1
#define TARGET_OS_IPHONE 0
#define TARGET_OS_IOS 0
#define TARGET_OS_TV 0
#define TARGET_OS_WATCH 0
#define TARGET_OS_SIMULATOR 0
