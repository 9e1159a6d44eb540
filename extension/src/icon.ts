/** The launcher and palette icon: a bar chart falling from FP32 to INT8 heights. */

import { LabIcon } from '@jupyterlab/ui-components';

const SVG = `<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24" width="24" height="24">
  <g class="jp-icon3" fill="#616161">
    <rect x="3" y="4" width="4" height="16" rx="1"/>
    <rect x="10" y="9" width="4" height="11" rx="1"/>
    <rect x="17" y="14" width="4" height="6" rx="1"/>
  </g>
</svg>`;

export const workbenchIcon = new LabIcon({ name: 'quantization-workbench:icon', svgstr: SVG });
