// A user mistake (missing export, wrong flag value): the CLI prints its message as one line, no stack.
export class HNetError extends Error {
  constructor(message) {
    super(message);
    this.name = 'HNetError';
  }
}
