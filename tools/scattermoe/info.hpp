// `scattermoe info`: what this build contains and which devices it sees.
#pragma once

namespace scattermoe::tools {

int run_info();

}  // namespace scattermoe::tools
