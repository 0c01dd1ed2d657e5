# Builds the addon with node-gyp (the install fallback and what prebuildify runs).
# Sources and defines come from sources.json, which CMakeLists.txt reads too.
{
  "targets": [
    {
      "target_name": "epd_transfer",
      "sources": [
        "<!@(node -p \"require('./sources.json').sources.join(' ')\")"
      ],
      "defines": [
        "<!@(node -p \"require('./sources.json').defines.join(' ')\")"
      ],
      "include_dirs": [
        "<!(node -p \"require('node-addon-api').include_dir\")",
        "native"
      ],
      "cflags!": ["-fno-exceptions"],
      "cflags_cc!": ["-fno-exceptions", "-fno-rtti", "-std=gnu++17"],
      "cflags_cc": ["-std=c++17", "-fexceptions", "-fvisibility=hidden", "-O3", "-Wall", "-Wextra", "-Wno-unused-parameter"],
      "cflags": ["-fvisibility=hidden"],
      "libraries": ["-lrt", "-ldl", "-lpthread"],
      "conditions": [
        ["OS=='linux'", {
          "ldflags": ["-Wl,--as-needed"]
        }]
      ]
    }
  ]
}
