// Force-included (-include) into the llama-cpp-python build by scripts/vulkan_tests.sh.
// Why: ggml-vulkan.cpp of ggml 0.25.3 always chains a vk::LayerSettingsCreateInfoEXT into
// vkCreateInstance, but Debian 12's Vulkan-Headers (1.3.239) predate VK_EXT_layer_settings
// (1.3.261+), so the file does not compile there. This declares only what that one call uses,
// with the C layout of the extension (VkLayerSettingEXT / VkLayerSettingsCreateInfoEXT).
// The guard keeps it out of every other translation unit: CMake defines
// ggml_vulkan_EXPORTS only for the ggml-vulkan target, and newer headers define the extension.
// Only the C header is included: ggml-vulkan-types.h sets VULKAN_HPP_DISPATCH_LOADER_DYNAMIC before
// it includes vulkan.hpp, and a vulkan.hpp included earlier (here) would fix the static dispatcher,
// whose direct calls to extension functions (vkGetPipelineExecutableStatisticsKHR) the loader
// library does not export: libggml-vulkan then fails to load.
#pragma once
#if defined(__cplusplus) && defined(ggml_vulkan_EXPORTS)
#include <vulkan/vulkan_core.h>
#ifndef VK_EXT_layer_settings
#include <cstdint>
#include <vector>
namespace vk {
enum class LayerSettingTypeEXT : int32_t {
    eBool32 = 0, eInt32 = 1, eInt64 = 2, eUint32 = 3, eUint64 = 4, eFloat32 = 5, eFloat64 = 6, eString = 7
};
struct LayerSettingEXT {
    const char *pLayerName;
    const char *pSettingName;
    LayerSettingTypeEXT type;
    uint32_t valueCount;
    const void *pValues;
};
struct LayerSettingsCreateInfoEXT {
    // VK_STRUCTURE_TYPE_LAYER_SETTINGS_CREATE_INFO_EXT (extension 497); a loader or driver that
    // does not know it skips it in the pNext chain, as with the real headers.
    VkStructureType sType = static_cast<VkStructureType>(1000496000);
    const void *pNext = nullptr;
    uint32_t settingCount = 0;
    const LayerSettingEXT *pSettings = nullptr;
    explicit LayerSettingsCreateInfoEXT(const std::vector<LayerSettingEXT> &s)
        : settingCount(static_cast<uint32_t>(s.size())), pSettings(s.data()) {}
};
}  // namespace vk
#endif
#endif
