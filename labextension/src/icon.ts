import { LabIcon } from '@jupyterlab/ui-components';

/** A GPU card: a board with a fan and contacts along its bottom edge. */
const svg = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161">
    <path d="M2 5h17a3 3 0 0 1 3 3v7a3 3 0 0 1-3 3H5v2H3V7H2zm3 2v9h14a1 1 0 0 0 1-1V8a1 1 0 0 0-1-1z"/>
    <path d="M14 8.5a3 3 0 1 1 0 6 3 3 0 0 1 0-6zm0 2a1 1 0 1 0 0 2 1 1 0 0 0 0-2z"/>
    <path d="M6 9h3v1.5H6zm0 3h3v1.5H6zM7 18h2v2H7zm3 0h2v2h-2zm3 0h2v2h-2z"/>
  </g>
</svg>`;

export const gpuIcon = new LabIcon({ name: 'gpu-magic:gpu', svgstr: svg });
