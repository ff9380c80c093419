module github.com/embervm/ember

go 1.26.0
